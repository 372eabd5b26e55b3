//! Token counts in the ledger's one meaning.

use serde::{Deserialize, Serialize};

/// Token counts of one request or one upstream attempt.
///
/// `cached_input` is a subset of `input`; `reasoning` is a subset of
/// `output`. Constructors that take provider numbers clamp the subsets so the
/// invariant holds even when a provider reports nonsense.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Tokens {
    pub fn new(input: u64, cached_input: u64, output: u64, reasoning: u64) -> Self {
        Self {
            input,
            cached_input: cached_input.min(input),
            output,
            reasoning: reasoning.min(output),
        }
    }

    pub fn uncached_input(&self) -> u64 {
        self.input - self.cached_input
    }

    pub fn total(&self) -> u64 {
        self.input + self.output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_are_clamped_to_their_totals() {
        let t = Tokens::new(10, 50, 3, 9);
        assert_eq!(t.cached_input, 10);
        assert_eq!(t.reasoning, 3);
        assert_eq!(t.uncached_input(), 0);
        assert_eq!(t.total(), 13);
    }
}
