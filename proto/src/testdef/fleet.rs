//! Fleet tests files (`edgeprobe-collector tests apply --file`) and the one selection rule:
//! the agent config's `[[test]]` blocks, each with an optional `select = { label = "value" }`
//! or `agents = ["id", ...]`, checked by the same code as the agent's own file; and ad-hoc
//! run-now tests (one block without `schedule` or `every`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::located::{from_toml, locate, ConfigError};
use super::test::{check_test, Scheduling, TestConfig};
use crate::bounds;

/// Only `[[test]]` blocks: the syntax of a fleet tests file and of what the collector
/// pushes to an agent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestsOnly {
    #[serde(default, rename = "test")]
    pub tests: Vec<TestConfig>,
}

/// One test of a fleet tests file.
#[derive(Debug, Clone)]
pub struct FleetTest {
    pub config: TestConfig,
    /// Labels an agent must all carry; empty with `agents` unset selects every agent.
    pub select: BTreeMap<String, String>,
    /// Agent ids the test runs on, instead of a label selection.
    pub agents: Option<Vec<String>>,
    /// The test as one `[[test]]` block without `select` / `agents`: what an agent gets.
    pub spec_toml: String,
}

impl FleetTest {
    /// Whether this test runs on the agent `agent_id` with `labels`.
    pub fn selects(&self, agent_id: &str, labels: &BTreeMap<String, String>) -> bool {
        selects(&self.select, self.agents.as_deref(), agent_id, labels)
    }
}

/// The selection rule of fleet tests and run-now, one for the agent's parser and the
/// collector's push, apply and run: `agents` names the agent, else every `select` label
/// equals one of the agent's (an empty `select` selects every agent).
pub fn selects(
    select: &BTreeMap<String, String>,
    agents: Option<&[String]>,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match agents {
        Some(ids) => ids.iter().any(|id| id == agent_id),
        None => select.iter().all(|(k, v)| labels.get(k) == Some(v)),
    }
}

/// A fleet tests file (`edgeprobe-collector tests apply --file`): the agent config's
/// `[[test]]` blocks, each with an optional `select = { label = "value" }` or
/// `agents = ["id", ...]`, checked by the same code as the agent's own file.
#[derive(Debug, Clone, Default)]
pub struct FleetFile {
    pub tests: Vec<FleetTest>,
}

impl FleetFile {
    /// Parses and checks a fleet tests file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<FleetFile, ConfigError> {
        let located = |(span, reason)| locate(text, origin, span, reason);
        let parsed: TestsOnly = from_toml(text, origin)?;
        let mut names = std::collections::HashSet::new();
        let mut tests = Vec::with_capacity(parsed.tests.len());
        for config in parsed.tests {
            check_test(&config, None, Scheduling::Required).map_err(located)?;
            let name = config.name.get_ref();
            if !names.insert(name.clone()) {
                return Err(located((
                    Some(config.name.span()),
                    format!("duplicate test name `{name}`"),
                )));
            }
            if let (Some(_), Some(agents)) = (&config.select, &config.agents) {
                return Err(located((
                    Some(agents.span()),
                    format!("test `{name}` sets both `select` and `agents`; choose one"),
                )));
            }
            if let Some(agents) = &config.agents {
                if agents.get_ref().is_empty() {
                    return Err(located((
                        Some(agents.span()),
                        format!(
                            "test `{name}`: `agents` is empty; leave it out to select every agent"
                        ),
                    )));
                }
                for id in agents.get_ref() {
                    bounds::agent_id(id).map_err(|e| {
                        located((Some(agents.span()), format!("test `{name}`: agents: {e}")))
                    })?;
                }
            }
            let spec_toml = config
                .block()
                .map_err(|e| located((Some(config.name.span()), format!("test `{name}`: {e}"))))?;
            tests.push(FleetTest {
                select: config
                    .select
                    .as_ref()
                    .map(|s| s.get_ref().clone())
                    .unwrap_or_default(),
                agents: config.agents.as_ref().map(|a| a.get_ref().clone()),
                spec_toml,
                config,
            });
        }
        Ok(FleetFile { tests })
    }
}

/// Parses one ad-hoc `[[test]]` block for run-now: name, kind, target, options and labels,
/// without `schedule` or `every`.
pub fn parse_adhoc_test(text: &str, origin: &str) -> Result<TestConfig, ConfigError> {
    let parsed: TestsOnly = from_toml(text, origin)?;
    let mut tests = parsed.tests.into_iter();
    let (Some(test), None) = (tests.next(), tests.next()) else {
        return Err(ConfigError::Unlocated {
            path: origin.to_string(),
            reason: "an ad-hoc test is exactly one [[test]] block".to_string(),
        });
    };
    let located = |(span, reason)| locate(text, origin, span, reason);
    if test.select.is_some() || test.agents.is_some() {
        return Err(located((
            Some(test.name.span()),
            "an ad-hoc test carries no `select` or `agents`".to_string(),
        )));
    }
    check_test(&test, None, Scheduling::Forbidden).map_err(located)?;
    Ok(test)
}

#[derive(Serialize)]
struct OneTest<'a> {
    test: [&'a TestConfig; 1],
}

impl TestConfig {
    /// This test as one `[[test]]` block without `select` / `agents`: what an agent is
    /// pushed, parsed back by [`TestsOnly`] to an equal test.
    pub fn block(&self) -> Result<String, toml::ser::Error> {
        let mut test = self.clone();
        test.select = None;
        test.agents = None;
        toml::to_string(&OneTest { test: [&test] })
    }
}
