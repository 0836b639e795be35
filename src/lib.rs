//! ollama-sidecar: a Pingora reverse proxy that makes one Ollama GPU box safe to share.
//! See `docs/architecture.md` for the request journey and the module map.

pub mod admin;
pub mod admission;
pub mod app;
pub mod config;
pub mod health_cmd;
pub mod keep_alive;
pub mod memory;
pub mod metrics;
pub mod models_view;
pub mod policy;
pub mod proxy;
pub mod reject;
pub mod reload;
pub mod route_class;
pub mod server;
pub mod shared_state;
pub mod supervisor;
pub mod upgrade;
pub mod upstream;
