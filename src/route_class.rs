//! What kind of work a request is. A leaf module: the configuration names classes
//! (`auth.keys[].routes`, `policy.deny_classes`) and the proxy classifies requests into them.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Generation and embeddings: admitted into a slot.
    Inference,
    /// Listing and describing: never waits.
    Metadata,
    /// pull/push/create/copy/delete/blobs: its own small limit.
    Management,
    /// Anything else (unknown paths, redirects, account routes): passed through, Ollama answers.
    Other,
}

impl RouteClass {
    /// Every class, in the order errors list them.
    pub const ALL: [RouteClass; 4] = [
        RouteClass::Inference,
        RouteClass::Metadata,
        RouteClass::Management,
        RouteClass::Other,
    ];

    /// Its name in the configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Inference => "inference",
            RouteClass::Metadata => "metadata",
            RouteClass::Management => "management",
            RouteClass::Other => "other",
        }
    }

    /// The class a configured name means.
    pub fn from_name(name: &str) -> Option<RouteClass> {
        RouteClass::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// As its configured name, so `check` prints what the file says.
impl fmt::Debug for RouteClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::RouteClass;

    #[test]
    fn every_name_reads_back_as_its_class() {
        for c in RouteClass::ALL {
            assert_eq!(RouteClass::from_name(c.as_str()), Some(c));
        }
        assert_eq!(RouteClass::from_name("chat"), None);
        assert_eq!(format!("{:?}", RouteClass::Management), "\"management\"");
    }
}
