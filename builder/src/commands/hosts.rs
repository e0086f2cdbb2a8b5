//! `builderctl hosts`: the host list and why each worker is in or out.

use std::process::ExitCode;

use super::{BuilderSetup, exit_for, survey_views};

pub async fn run(setup: &BuilderSetup, json: bool) -> anyhow::Result<ExitCode> {
    let local = setup.local_compilers()?;
    let (_, list) = survey_views(setup, &local).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", list.explain());
    }
    Ok(exit_for(list.included().next().is_some()))
}
