//! TEMPORARY STUB
use super::*;
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NetworkArgs {
    #[arg(long)]
    pub policy: Option<String>,
    #[arg(long)]
    pub map: Vec<String>,
    #[arg(long)]
    pub reject: bool,
    #[arg(long)]
    pub max_connections: Option<usize>,
}
impl NetworkArgs {
    pub fn resolve(&self) -> Result<NetworkConfig, ConfigError> {
        let map = self
            .map
            .iter()
            .map(|m| m.parse().map_err(ConfigError))
            .collect::<Result<_, _>>()?;
        Ok(NetworkConfig {
            map,
            policy: self.policy.clone(),
            deny_action: if self.reject {
                DenyAction::Reject
            } else {
                DenyAction::Drop
            },
            max_connections: self.max_connections,
            ..Default::default()
        })
    }
}
