//! E-mail to key owners: the delivery channel of services of format `email`. Each key
//! event such a service subscribes to goes, through the same durable outbox, retries and
//! confirmation as a webhook, to the owner of the key as a message for people
//! (`messages::for_event`). lettre speaks SMTP; the relay is `serve --smtp URL`.

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::messages;

/// The SMTP relay and the From address.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// Why a message was not sent: `retry` says whether trying again can help.
#[derive(Debug)]
pub struct MailError {
    pub message: String,
    pub retry: bool,
}

impl Mailer {
    /// From `serve --smtp` and `--smtp-from`; an error names what is wrong (never the
    /// URL, which may hold a password).
    pub fn new(url: &str, from: &str) -> Result<Self, String> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| {
                format!(
                    "--smtp is not a usable SMTP URL: {}",
                    redact(&e.to_string(), url)
                )
            })?
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        let from = from
            .parse::<Mailbox>()
            .map_err(|e| format!("--smtp-from {from:?} is not an e-mail address: {e}"))?;
        Ok(Self { transport, from })
    }

    /// Sends the message for a key event (its Standard Webhooks body) to the key's owner.
    pub async fn send_event(&self, event: &serde_json::Value) -> Result<(), MailError> {
        let owner = event["data"]["key"]["owner"].as_str().unwrap_or("");
        let to: Mailbox = owner.parse().map_err(|_| MailError {
            message: format!("the key's owner {owner:?} is not an e-mail address"),
            retry: false,
        })?;
        let m = messages::for_event(event);
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(m.subject)
            .body(m.body)
            .map_err(|e| MailError {
                message: format!("cannot build the message: {e}"),
                retry: false,
            })?;
        self.transport
            .send(email)
            .await
            .map(|_| ())
            .map_err(|e| MailError {
                message: format!("SMTP: {e}"),
                // A permanent refusal (5xx: no such mailbox) will not change by itself.
                retry: !e.is_permanent(),
            })
    }
}

fn redact(text: &str, url: &str) -> String {
    if url.is_empty() {
        text.to_owned()
    } else {
        text.replace(url, "(the URL)")
    }
}
