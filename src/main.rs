//! turnpike relay binary (placeholder).
fn main() {}
