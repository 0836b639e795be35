//! The test harness itself: a child is only taken as started when it holds its own port. The old
//! check (anything accepts on the port) let a mock that failed to bind pass while a parallel
//! test's process held that port, and the test then failed later with "connection refused".

mod common;

use common::*;
use std::net::TcpListener;

#[test]
fn a_port_held_by_another_process_is_not_taken_for_the_mock() {
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().expect("addr").port();
    assert!(port_open(port), "the squatter accepts connections");
    let outcome = std::panic::catch_unwind(|| Mock::start_on(port, &[]));
    assert!(
        outcome.is_err(),
        "a mock that could not bind {port} was reported as started"
    );
    // `start` moves on to a fresh port and gets a mock that really listens.
    let mock = Mock::start(&[]);
    assert!(listens_on(mock.proc.pid(), mock.port));
    assert!(!listens_on(std::process::id(), mock.port));
}
