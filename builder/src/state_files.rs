//! distcc's per-process state files (`$DISTCC_DIR/state/binstate_PID`), what
//! `distccmon-text` reads: each running distcc client rewrites its file with its current
//! phase, host and slot.
//!
//! The file is distcc's `struct dcc_task_state` (src/state.h) in native layout:
//!
//! ```text
//! size_t struct_size; unsigned long magic; unsigned long cpid;
//! char file[128]; char host[128]; int slot; enum dcc_phase curr_phase;
//! struct dcc_task_state *next;
//! ```
//!
//! On LP64 (x86_64, aarch64) that is 296 bytes; on ILP32 280. The builder runs next to
//! the distcc client, so the native word size is the right one.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::untrusted::printable;

/// `DCC_STATE_MAGIC`, "DIH\0".
pub const STATE_MAGIC: u64 = 0x4449_4800;
/// File names start with this, then the client's pid.
pub const STATE_PREFIX: &str = "binstate_";
/// distccmon ignores (and deletes) files not rewritten for this long: a killed client.
pub const MAX_AGE: Duration = Duration::from_secs(60);

const NAME_LEN: usize = 128;

/// distcc's `enum dcc_phase`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    Startup,
    Blocked,
    Connect,
    Preprocess,
    Send,
    Compile,
    Receive,
    Done,
    Unknown,
}

impl Phase {
    fn from_raw(raw: i32) -> Self {
        match raw {
            0 => Self::Startup,
            1 => Self::Blocked,
            2 => Self::Connect,
            3 => Self::Preprocess,
            4 => Self::Send,
            5 => Self::Compile,
            6 => Self::Receive,
            7 => Self::Done,
            _ => Self::Unknown,
        }
    }

    /// distcc's own names (`dcc_get_phase_name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Startup => "Startup",
            Self::Blocked => "Blocked",
            Self::Connect => "Connect",
            Self::Preprocess => "Preprocess",
            Self::Send => "Send",
            Self::Compile => "Compile",
            Self::Receive => "Receive",
            Self::Done => "Done",
            Self::Unknown => "Unknown",
        }
    }
}

/// One distcc client's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskState {
    pub pid: u64,
    pub file: String,
    pub host: String,
    pub slot: i32,
    pub phase: Phase,
}

/// Field layout for a word size.
struct Layout {
    word: usize,
}

impl Layout {
    const NATIVE: Layout = Layout {
        word: std::mem::size_of::<usize>(),
    };

    fn size(&self) -> usize {
        // 3 words, 2 names, 2 ints, a pointer; padded to the word.
        let unpadded = 3 * self.word + 2 * NAME_LEN + 2 * 4 + self.word;
        unpadded.div_ceil(self.word) * self.word
    }

    fn word_at(&self, bytes: &[u8], offset: usize) -> Option<u64> {
        let field = bytes.get(offset..offset + self.word)?;
        Some(match self.word {
            4 => u64::from(u32::from_ne_bytes(field.try_into().ok()?)),
            _ => u64::from_ne_bytes(field.try_into().ok()?),
        })
    }
}

fn int_at(bytes: &[u8], offset: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn name_at(bytes: &[u8], offset: usize) -> Option<String> {
    let field = bytes.get(offset..offset + NAME_LEN)?;
    let end = field.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    // Source file names are the build's: `monitor` prints them, so no escape sequences.
    Some(printable(&String::from_utf8_lossy(&field[..end])).into_owned())
}

/// Parse one state file's bytes; `None` for a short, foreign or differently sized record
/// (distccmon skips those too).
pub fn parse(bytes: &[u8]) -> Option<TaskState> {
    parse_with(&Layout::NATIVE, bytes)
}

fn parse_with(layout: &Layout, bytes: &[u8]) -> Option<TaskState> {
    let w = layout.word;
    if bytes.len() != layout.size()
        || layout.word_at(bytes, 0)? != layout.size() as u64
        || layout.word_at(bytes, w)? != STATE_MAGIC
    {
        return None;
    }
    let names = 3 * w;
    let ints = names + 2 * NAME_LEN;
    Some(TaskState {
        pid: layout.word_at(bytes, 2 * w)?,
        file: name_at(bytes, names)?,
        host: name_at(bytes, names + NAME_LEN)?,
        slot: int_at(bytes, ints)?,
        phase: Phase::from_raw(int_at(bytes, ints + 4)?),
    })
}

/// The live tasks under `distcc_dir/state`, ordered by host, slot and pid. Files older
/// than [`MAX_AGE`], of processes that are gone, or of finished tasks are skipped (not
/// deleted: the clients own them).
pub fn read_states(distcc_dir: &Path, now: SystemTime) -> std::io::Result<Vec<TaskState>> {
    let dir = distcc_dir.join("state");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut tasks = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(STATE_PREFIX)
        {
            continue;
        }
        let fresh = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|mtime| now.duration_since(mtime).unwrap_or_default() <= MAX_AGE);
        if !fresh {
            continue;
        }
        // A file vanishing between listing and reading is a client finishing: skip it.
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Some(task) = parse(&bytes) else { continue };
        if task.phase == Phase::Done || !Path::new(&format!("/proc/{}", task.pid)).exists() {
            continue;
        }
        tasks.push(task);
    }
    tasks.sort_by(|a, b| (&a.host, a.slot, a.pid).cmp(&(&b.host, b.slot, b.pid)));
    Ok(tasks)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A record as distcc writes it, for a word size.
    fn record(word: usize, pid: u64, file: &str, host: &str, slot: i32, phase: i32) -> Vec<u8> {
        let layout = Layout { word };
        let put_word = |out: &mut Vec<u8>, v: u64| match word {
            4 => out.extend_from_slice(&(v as u32).to_ne_bytes()),
            _ => out.extend_from_slice(&v.to_ne_bytes()),
        };
        let put_name = |out: &mut Vec<u8>, s: &str| {
            let mut field = [0u8; NAME_LEN];
            field[..s.len()].copy_from_slice(s.as_bytes());
            out.extend_from_slice(&field);
        };
        let mut out = Vec::new();
        put_word(&mut out, layout.size() as u64);
        put_word(&mut out, STATE_MAGIC);
        put_word(&mut out, pid);
        put_name(&mut out, file);
        put_name(&mut out, host);
        out.extend_from_slice(&slot.to_ne_bytes());
        out.extend_from_slice(&phase.to_ne_bytes());
        put_word(&mut out, 0xdead_beef); // `next`: undefined in the file
        out.resize(layout.size(), 0);
        out
    }

    #[test]
    fn lp64_layout_is_distccs() {
        assert_eq!(Layout { word: 8 }.size(), 296);
        assert_eq!(Layout { word: 4 }.size(), 280);
    }

    #[test]
    fn records_parse_for_both_word_sizes() {
        for word in [4, 8] {
            let bytes = record(word, 4242, "kernel/fork.c", "198.18.0.11:3632", 2, 5);
            let task = parse_with(&Layout { word }, &bytes).unwrap();
            assert_eq!(
                task,
                TaskState {
                    pid: 4242,
                    file: "kernel/fork.c".into(),
                    host: "198.18.0.11:3632".into(),
                    slot: 2,
                    phase: Phase::Compile,
                }
            );
        }
    }

    #[test]
    fn foreign_short_and_odd_records_are_skipped() {
        let good = record(8, 1, "a.c", "h", 0, 3);
        assert!(parse_with(&Layout { word: 8 }, &good).is_some());
        assert!(parse_with(&Layout { word: 8 }, &good[..200]).is_none());
        let mut bad_magic = good.clone();
        bad_magic[8] ^= 0xff;
        assert!(parse_with(&Layout { word: 8 }, &bad_magic).is_none());
        let mut unterminated = good;
        unterminated[24..24 + NAME_LEN].fill(b'x');
        assert_eq!(
            parse_with(&Layout { word: 8 }, &unterminated)
                .unwrap()
                .file
                .len(),
            NAME_LEN
        );
        assert_eq!(Phase::from_raw(99), Phase::Unknown);
    }

    #[test]
    fn a_directory_of_states_lists_live_tasks_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let me = u64::from(std::process::id());
        let word = std::mem::size_of::<usize>();
        std::fs::write(
            state.join(format!("binstate_{me}")),
            record(word, me, "b.c", "w2", 1, 5),
        )
        .unwrap();
        std::fs::write(
            state.join("binstate_1"),
            record(word, me, "a.c", "w1", 0, 4),
        )
        .unwrap();
        // Finished, dead process, not a state file:
        std::fs::write(
            state.join("binstate_2"),
            record(word, me, "done.c", "w1", 0, 7),
        )
        .unwrap();
        std::fs::write(
            state.join("binstate_3"),
            record(word, u64::from(u32::MAX), "x.c", "w1", 0, 5),
        )
        .unwrap();
        std::fs::write(state.join("lock_x"), b"junk").unwrap();
        let tasks = read_states(dir.path(), SystemTime::now()).unwrap();
        let files: Vec<&str> = tasks.iter().map(|t| t.file.as_str()).collect();
        assert_eq!(files, ["a.c", "b.c"]);
        // Stale files are ignored.
        let later = SystemTime::now() + MAX_AGE + Duration::from_secs(5);
        assert!(read_states(dir.path(), later).unwrap().is_empty());
        assert!(
            read_states(&dir.path().join("none"), SystemTime::now())
                .unwrap()
                .is_empty()
        );
    }
}
