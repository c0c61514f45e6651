//! E-mail to key owners: the delivery channel of services of format `email`. Each key
//! event such a service subscribes to goes, through the same durable outbox, retries and
//! confirmation as a webhook, to the owner of the key as a message for people
//! (`messages::for_event`); an alert on a source network, which names no key, goes to
//! the security contact (`serve --smtp-security-to`). lettre speaks SMTP; the relay is
//! `serve --smtp URL`.

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::messages;

/// The SMTP relay and the From address.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// Who is told of alerts that name no key (BRUTE_FORCE from a source network).
    security_to: Option<Mailbox>,
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
    pub fn new(url: &str, from: &str, security_to: Option<&str>) -> Result<Self, String> {
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
        let security_to = security_to
            .map(|to| {
                to.parse::<Mailbox>()
                    .map_err(|e| format!("--smtp-security-to {to:?} is not an e-mail address: {e}"))
            })
            .transpose()?;
        Ok(Self {
            transport,
            from,
            security_to,
        })
    }

    /// Sends the message for a key event (its Standard Webhooks body) to the key's owner;
    /// an event on a source (no key, no owner) to the security contact.
    pub async fn send_event(&self, event: &serde_json::Value) -> Result<(), MailError> {
        let to: Mailbox = if event["data"]["key_id"].is_null() {
            self.security_to.clone().ok_or_else(|| MailError {
                message: "an alert on a source names no key owner to mail; set serve \
                          --smtp-security-to to mail such alerts"
                    .to_owned(),
                retry: false,
            })?
        } else {
            let owner = event["data"]["key"]["owner"].as_str().unwrap_or("");
            owner.parse().map_err(|_| MailError {
                message: format!("the key's owner {owner:?} is not an e-mail address"),
                retry: false,
            })?
        };
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
