//! Pingora alone, as a plain reverse proxy: the floor under the sidecar's overhead in
//! `benches/run.sh`. Same Pingora version, server options and listener settings as the sidecar
//! (`server::server_conf`, `server::proxy_listener`), and nothing else: no routing, admission,
//! policy, metrics or logging. What the sidecar costs above this is ours; what this costs above
//! nginx is Pingora's.
//!
//!   cargo run --release --example pingora_floor -- LISTEN UPSTREAM [THREADS]
//!
//! LISTEN and UPSTREAM are `host:port`; THREADS defaults to the core count (the sidecar's
//! default). Stop it with SIGKILL or SIGINT.

use async_trait::async_trait;
use ollama_sidecar::server;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_proxy::{ProxyHttp, Session};

struct Floor {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> pingora_error::Result<()> {
        // As the sidecar and the nginx configuration do: Ollama checks the Host header.
        request.insert_header(http::header::HOST, self.upstream.as_str())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let threads = match args.get(2).map(|t| t.parse::<usize>()) {
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("pingora_floor: THREADS must be a positive number");
            std::process::exit(2);
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut server = Server::new_with_opt_and_conf(None, server::server_conf(threads));
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(
        &server.configuration,
        Floor {
            upstream: upstream.clone(),
        },
    );
    proxy.add_listener(server::proxy_listener(listen.clone()));
    server.add_service(proxy);
    server.run_forever();
}
