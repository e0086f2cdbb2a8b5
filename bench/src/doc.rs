//! Writing a case's table into docs/BENCHMARKS.md, replacing its previous one.

use std::path::Path;

use anyhow::{Context, Result};

/// Where generated sections go when the document has no `bench:caseN` markers yet.
const SUITE_END: &str = "<!-- bench:end -->";

fn markers(case: u32) -> (String, String) {
    (
        format!("<!-- bench:case{case}:begin (written by bench/run; edits are overwritten) -->"),
        format!("<!-- bench:case{case}:end -->"),
    )
}

/// Replace what lies between case `case`'s markers with `markdown`; without markers, insert
/// a marked block before `<!-- bench:end -->`, else at the end of the document.
pub fn replace_section(path: &Path, case: u32, markdown: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let updated = replace_in(&text, case, markdown);
    let tmp = path.with_extension("md.bench-tmp");
    std::fs::write(&tmp, updated).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn replace_in(text: &str, case: u32, markdown: &str) -> String {
    let (begin, end) = markers(case);
    let block = format!("{begin}\n{}\n{end}", markdown.trim_end());
    let begin_key = format!("<!-- bench:case{case}:begin");
    if let (Some(b), Some(e)) = (text.find(&begin_key), text.find(&end))
        && b < e
    {
        return format!("{}{block}{}", &text[..b], &text[e + end.len()..]);
    }
    match text.find(SUITE_END) {
        Some(at) => format!("{}{block}\n\n{}", &text[..at], &text[at..]),
        None => format!("{}\n{block}\n", text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_and_inserted() {
        let doc = "# T\n\nintro\n\n<!-- bench:end -->\n\n## After\n";
        let one = replace_in(doc, 2, "table A");
        assert!(one.contains("table A\n<!-- bench:case2:end -->\n\n<!-- bench:end -->"));
        let two = replace_in(&one, 2, "table B");
        assert!(!two.contains("table A") && two.contains("table B"));
        assert!(two.ends_with("## After\n"));
        let three = replace_in(&two, 1, "table C");
        assert!(three.find("table B") < three.find("table C"));
        let bare = replace_in("# T\n", 4, "x");
        assert!(bare.starts_with("# T\n<!-- bench:case4:begin"));
    }
}
