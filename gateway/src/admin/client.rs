use std::path::Path;

pub fn status(_socket: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("being built")
}

pub fn sessions(_socket: &Path, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("being built")
}
