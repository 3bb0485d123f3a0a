//! The I/O driver: the only code that touches sockets.

pub fn serve(_args: crate::config::ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve: being built")
}
