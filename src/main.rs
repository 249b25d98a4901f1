//! The `lmtp-ingest` command.

use mimalloc::MiMalloc;

// mimalloc: fast per-thread allocation for the per-message buffers that move
// between shard and writer threads.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    println!("lmtp-ingest {}", env!("CARGO_PKG_VERSION"));
}
