//! What the benchmark's helper programs share: one event POST, as the naive pattern and the load
//! generator both send it.

/// POSTs one JSON event with the Bearer key and an `Idempotency-Key`; true on a 2xx. The body of
/// the answer is read so that the connection goes back to the pool and is kept alive.
pub async fn post_event(
    client: &reqwest::Client,
    endpoint: &str,
    api_key: &str,
    idempotency_key: String,
    body: Vec<u8>,
) -> bool {
    let response = client
        .post(endpoint)
        .bearer_auth(api_key)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", idempotency_key)
        .body(body)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            response.bytes().await.is_ok() && status.is_success()
        }
        Err(_) => false,
    }
}
