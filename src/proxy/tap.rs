//! The stream tap: reads the response chunks the proxy relays, without delaying or copying them,
//! to find the first token, the final token counts and in-band errors. (Stub: the metrics work
//! fills it in.)

use std::time::Duration;

/// What a response said about itself.
#[derive(Debug, Default, Clone)]
pub struct TapSummary {
    pub first_token: Option<Duration>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub struct StreamTap {
    summary: TapSummary,
}

impl StreamTap {
    /// Called once with the response header's content type.
    pub fn start(&mut self, _content_type: Option<&str>) {}

    /// Called for each relayed body chunk, `at` after the request started.
    pub fn observe(&mut self, _chunk: &[u8], _at: Duration) {}

    pub fn summary(&self) -> &TapSummary {
        &self.summary
    }
}
