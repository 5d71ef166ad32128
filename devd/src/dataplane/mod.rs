//! devd's data plane: the engine thread that serves Queued connections.
//! Direct connections never pass through here (devd is not on their path).

pub mod engine;

#[cfg(test)]
mod tests;
