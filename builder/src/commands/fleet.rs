//! Operations on every worker: `validate`, `smoketest`, `reset`, `bootstrap`.

use std::process::ExitCode;

use distcc_builder::ops::{self, Operation};

use super::{BuilderSetup, exit_for, print_workers_json};

pub async fn validate(setup: &BuilderSetup, json: bool) -> anyhow::Result<ExitCode> {
    let local = setup.local_compilers().unwrap_or_default();
    let (probes, _) = setup.survey(&local).await?;
    let access = setup.access()?;
    let results = futures_util::future::join_all(probes.iter().map(|p| {
        ops::validate_one(
            p,
            access,
            &local,
            setup.config.deadline,
            setup.config.operation_deadline,
        )
    }))
    .await;
    if json {
        print_workers_json(&results)?;
    } else {
        for w in &results {
            println!("{} {}", w.endpoint, if w.passed { "ok" } else { "FAILED" });
            for c in &w.checks {
                println!(
                    "  [{}] {:<26} {}",
                    if c.passed { " ok " } else { "FAIL" },
                    c.name,
                    c.reason
                );
                if !c.hint.is_empty() {
                    println!("         {:<26} fix: {}", "", c.hint);
                }
            }
        }
    }
    Ok(exit_for(results.iter().all(|w| w.passed)))
}

pub async fn smoketest(setup: &BuilderSetup, json: bool) -> anyhow::Result<ExitCode> {
    let access = setup.access()?;
    let results = futures_util::future::join_all(setup.config.workers.iter().map(|w| {
        ops::smoketest_one(
            w,
            access,
            setup.config.deadline,
            setup.config.operation_deadline,
        )
    }))
    .await;
    if json {
        print_workers_json(&results)?;
    } else {
        for r in &results {
            println!(
                "[{}] {:<22} {}",
                if r.passed { " ok " } else { "FAIL" },
                r.endpoint,
                r.detail
            );
        }
    }
    Ok(exit_for(results.iter().all(|r| r.passed)))
}

/// `reset` and `bootstrap`.
pub async fn control(
    setup: &BuilderSetup,
    operation: Operation,
    names: &[String],
    rolling: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let workers = ops::select_workers(&setup.config.workers, names)?;
    let admin = setup.config.admin_access()?;
    let results = ops::control_all(
        &workers,
        &admin,
        operation,
        setup.config.deadline,
        setup.config.operation_deadline,
        rolling,
    )
    .await;
    if json {
        print_workers_json(&results)?;
    } else {
        for r in &results {
            println!(
                "[{}] {:<22} {}",
                if r.passed { " ok " } else { "FAIL" },
                r.endpoint,
                r.error.clone().unwrap_or_else(|| format!(
                    "distccd {}",
                    r.distccd_state.as_deref().unwrap_or("?")
                ))
            );
            for step in &r.steps {
                println!("       {step}");
            }
        }
    }
    Ok(exit_for(results.iter().all(|r| r.passed)))
}
