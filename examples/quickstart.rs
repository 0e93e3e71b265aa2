//! The client library in a few lines: create a bucket, send events, read the aggregate.
//!
//! Start the daemon first (`cargo run --release --bin bucketlyd`), then:
//! `BUCKETLY_USER=admin BUCKETLY_PASSWORD=admin cargo run --example quickstart`.

use bucketly::Client;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect(("127.0.0.1", bucketly::config::DEFAULT_PORT)).await?;
    let user = std::env::var("BUCKETLY_USER").unwrap_or_else(|_| "admin".into());
    let password = std::env::var("BUCKETLY_PASSWORD").map_err(|_| "set BUCKETLY_PASSWORD")?;
    client.login(&user, &password).await?;
    match client.create("quickstart", "unique", None).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(bucketly::protocol::ErrorCode::BucketExists) => {}
        Err(e) => return Err(e.into()),
    }
    let clicks = ["/home alice", "/home bob", "/home alice", "/pricing carol"];
    let outcome = client.send("quickstart", &clicks).await?;
    println!(
        "accepted {} events, rejected {}",
        outcome.accepted, outcome.rejected
    );
    println!(
        "unique visitors per page: {}",
        client.view("quickstart", None).await?
    );
    println!("dumped (and reset): {}", client.dump("quickstart").await?);
    Ok(())
}
