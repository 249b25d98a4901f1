//! The `lmtp-ingest` command: parses the command line and hands off to
//! [`cli`]. Nothing else lives here, so each subcommand group stays in its
//! own file under `src/cli/`.

mod cli;

use mimalloc::MiMalloc;

// mimalloc: fast per-thread allocation for the per-message buffers that move
// between shard and writer threads.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
