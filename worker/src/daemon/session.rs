//! The worker's connection to the coordinator: connect (again, after a
//! jittered backoff, whenever it is lost), register with the site's
//! datasets and policy, keep the connection alive with heartbeats, and hand
//! each task the coordinator streams to its handler, once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meridian_sys::sync::lock;
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::{MAX_DECODING_BYTES, Worker, backoff};
use crate::error::WorkerError;

impl Worker {
    /// Serves sessions until shutdown, reconnecting after each lost one
    /// with [`backoff::delay`]; the attempts count from 0 again whenever a
    /// session got as far as registering.
    pub(crate) async fn serve(self: &Arc<Self>) {
        let mut attempt = 0u32;
        while !self.shutdown.is_cancelled() {
            let mut registered = false;
            let ended = Arc::clone(self).session(&mut registered).await;
            if registered {
                attempt = 0;
            }
            let delay = backoff::delay(attempt, &mut rand::rng());
            if let Err(e) = ended {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "connection to coordinator lost");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            attempt = attempt.saturating_add(1);
        }
    }

    /// One connection: register, then serve the task stream until it ends.
    async fn session(self: Arc<Self>, registered: &mut bool) -> Result<(), WorkerError> {
        let channel = self.endpoint.connect().await.map_err(WorkerError::Connect)?;
        let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(MAX_DECODING_BYTES);
        let reply = self.register(&mut client).await?;
        info!(site = %reply.site, "registered with the coordinator");
        *registered = true;
        self.idle_timeout_secs.store(reply.idle_timeout_secs.max(1), Ordering::Relaxed);
        let session_done = self.shutdown.child_token();
        let heartbeat_every = Duration::from_secs((reply.idle_timeout_secs / 3).max(1));
        self.tasks.spawn(heartbeats(client.clone(), heartbeat_every, session_done.clone()));
        {
            let (mut link, done, this) = (client.clone(), session_done.clone(), Arc::clone(&self));
            let mirrored = reply.mirrored.unwrap_or_default();
            self.tasks.spawn(async move { this.sync_ledger(&mut link, mirrored, done).await });
        }
        let result = self.receive_tasks(client).await;
        session_done.cancel();
        result
    }

    /// Announces the site's datasets and policy. The ledger follows in
    /// batches through `SyncLedger`: a long one would not fit one message.
    async fn register(
        self: &Arc<Self>,
        client: &mut WorkerServiceClient<Channel>,
    ) -> Result<pb::RegisterResponse, WorkerError> {
        let this = Arc::clone(self);
        let datasets = tokio::task::spawn_blocking(move || this.announcements())
            .await
            .map_err(WorkerError::panicked("announcing the datasets"))?;
        let request = pb::RegisterRequest {
            datasets,
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            ledger: Vec::new(),
            policy: Some(self.policy()),
        };
        Ok(client.register(request).await?.into_inner())
    }

    /// Dispatches the coordinator's tasks until the stream ends (an error)
    /// or the daemon shuts down (not one).
    async fn receive_tasks(self: &Arc<Self>, mut client: WorkerServiceClient<Channel>) -> Result<(), WorkerError> {
        let mut stream = client.receive_tasks(pb::ReceiveTasksRequest {}).await?.into_inner();
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                next = stream.next() => next,
            };
            match next {
                None => return Err(WorkerError::StreamClosed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(task)) => self.dispatch(task, client.clone()),
            }
        }
    }

    /// Starts the handler of a task, unless the same task is being handled
    /// already; a cancellation is handled at once.
    fn dispatch(self: &Arc<Self>, task: pb::Task, client: WorkerServiceClient<Channel>) {
        let Some(kind) = task.kind else { return };
        let key = match &kind {
            pb::task::Kind::Offer(_) => format!("{}/offer", task.job_id),
            pb::task::Kind::Train(t) => format!("{}/train/{}", task.job_id, t.round),
            pb::task::Kind::Evaluate(t) => format!("{}/evaluate/{}", task.job_id, t.round),
            pb::task::Kind::Cancel(c) => return self.cancel_job(&task.job_id, &c.reason),
        };
        if !lock(&self.inflight).insert(key.clone()) {
            return;
        }
        let this = Arc::clone(self);
        let job_id = task.job_id;
        self.tasks.spawn(async move {
            let mut client = client;
            let outcome = match kind {
                pb::task::Kind::Offer(offer) => this.handle_offer(&job_id, offer, &mut client).await,
                pb::task::Kind::Train(t) => this.handle_train(&job_id, t, &mut client).await,
                pb::task::Kind::Evaluate(t) => this.handle_evaluate(&job_id, t, &mut client).await,
                pb::task::Kind::Cancel(_) => Ok(()),
            };
            if let Err(e) = outcome {
                warn!(job_id, task = %key, error = %e, "task failed");
            }
            lock(&this.inflight).remove(&key);
        });
    }

    /// The coordinator stopped a job: a pending offer stops waiting, its
    /// training stops, and the job ends here.
    fn cancel_job(&self, job_id: &str, reason: &str) {
        info!(job_id = %job_id, reason = %reason, "job stopped by the coordinator");
        lock(&self.stopped).insert(job_id.to_string());
        if let Err(e) = self.approvals.stop(job_id) {
            warn!(error = %e, "cannot mark the job's offer stopped");
        }
        if let Some(job) = lock(&self.jobs).get(job_id) {
            job.cancel.cancel();
        }
        self.finish(job_id);
    }
}

/// Heartbeats every `every` until `done` or the first that fails.
async fn heartbeats(mut client: WorkerServiceClient<Channel>, every: Duration, done: CancellationToken) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.heartbeat(pb::HeartbeatRequest {}).await.is_err() {
            return;
        }
    }
}
