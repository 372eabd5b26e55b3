//! Token counts in the ledger's one meaning.

use serde::{Deserialize, Serialize};

/// Token counts of one request or one upstream attempt.
///
/// `cached_input` is a subset of `input`; `reasoning` is a subset of
/// `output`. When a provider reports a subset larger than its parent, the
/// parent widens to the subset, never the other way round: a count the
/// provider says it generated is billed (DeepSeek has answered
/// `completion_tokens: 0` beside `reasoning_tokens: 60`).
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
            input: input.max(cached_input),
            cached_input,
            output: output.max(reasoning),
            reasoning,
        }
    }

    pub fn uncached_input(&self) -> u64 {
        self.input.saturating_sub(self.cached_input)
    }

    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subset_larger_than_its_parent_widens_the_parent() {
        let t = Tokens::new(10, 50, 3, 9);
        assert_eq!((t.input, t.cached_input), (50, 50));
        assert_eq!((t.output, t.reasoning), (9, 9));
        assert_eq!(t.uncached_input(), 0);
        assert_eq!(t.total(), 59);
        let fine = Tokens::new(10, 4, 8, 2);
        assert_eq!(
            fine,
            Tokens {
                input: 10,
                cached_input: 4,
                output: 8,
                reasoning: 2
            }
        );
    }
}
