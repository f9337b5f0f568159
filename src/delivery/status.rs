//! The outcome of one delivery attempt, typed as done, temporary or
//! permanent, each with its RFC 3463 enhanced status code: what the queue
//! decides on, what `ctl queue show` and the bounce report.

use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    class: u8,
    subject: u16,
    detail: u16,
}

impl EnhancedCode {
    /// 2.0.0: delivered.
    pub const DELIVERED: Self = Self::new(2, 0, 0);
    /// 4.0.0: a temporary failure with nothing more specific to say.
    pub const TEMPORARY: Self = Self::new(4, 0, 0);
    /// 4.3.0: a temporary failure of this system (a program asking to be
    /// retried, a worker lost, an unreadable queue file).
    pub const SYSTEM_TEMPORARY: Self = Self::new(4, 3, 0);
    /// 4.4.0: the relay gave no answer for a recipient.
    pub const NO_ANSWER: Self = Self::new(4, 4, 0);
    /// 4.4.1: the relay could not be reached.
    pub const NO_CONNECTION: Self = Self::new(4, 4, 1);
    /// 4.4.7: the message expired in the queue.
    pub const EXPIRED: Self = Self::new(4, 4, 7);
    /// 5.0.0: a permanent failure with nothing more specific to say.
    pub const PERMANENT: Self = Self::new(5, 0, 0);
    /// 5.3.0: the program refused the message for good.
    pub const PROGRAM_REFUSED: Self = Self::new(5, 3, 0);
    /// 5.3.5: this system is not set up to deliver there (no relay).
    pub const NOT_CONFIGURED: Self = Self::new(5, 3, 5);
    /// 5.1.1: the recipient's alias is gone.
    pub const UNKNOWN_RECIPIENT: Self = Self::new(5, 1, 1);
    /// 5.4.6: a mail loop.
    pub const LOOP: Self = Self::new(5, 4, 6);

    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }

    /// Reads `2.1.5`: class 2, 4 or 5, then subject and detail of 1 to 3
    /// digits (RFC 3463); anything else is `None`, and a relay's reply
    /// that carries no such code is read by its class alone.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let mut number = |most: usize| {
            parts
                .next()
                .filter(|p| (1..=most).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u16>().ok())
        };
        let class = number(1).and_then(|c| u8::try_from(c).ok())?;
        let (subject, detail) = (number(3)?, number(3)?);
        (matches!(class, 2 | 4 | 5) && parts.next().is_none())
            .then_some(Self::new(class, subject, detail))
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// The outcome of one delivery attempt, with its enhanced status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    Delivered(EnhancedCode),
    /// Try again later; the text says why.
    Temporary(EnhancedCode, String),
    /// Return to the sender; the text says why.
    Permanent(EnhancedCode, String),
}

impl DeliveryStatus {
    /// Delivered, 2.0.0.
    pub const DELIVERED: Self = DeliveryStatus::Delivered(EnhancedCode::DELIVERED);

    /// A temporary failure of this system (4.3.0).
    pub fn system_temporary(why: impl Into<String>) -> Self {
        DeliveryStatus::Temporary(EnhancedCode::SYSTEM_TEMPORARY, why.into())
    }

    /// Try again later (4.0.0); `why` is logged and shown by `ctl`.
    pub fn temporary(why: impl Into<String>) -> Self {
        DeliveryStatus::Temporary(EnhancedCode::TEMPORARY, why.into())
    }

    /// Failed for good (5.0.0): returned to the sender with `why`.
    pub fn permanent(why: impl Into<String>) -> Self {
        DeliveryStatus::Permanent(EnhancedCode::PERMANENT, why.into())
    }

    pub fn code(&self) -> EnhancedCode {
        match self {
            DeliveryStatus::Delivered(code)
            | DeliveryStatus::Temporary(code, _)
            | DeliveryStatus::Permanent(code, _) => *code,
        }
    }

    /// Why it failed; empty when delivered.
    pub fn diagnostic(&self) -> &str {
        match self {
            DeliveryStatus::Delivered(_) => "",
            DeliveryStatus::Temporary(_, why) | DeliveryStatus::Permanent(_, why) => why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_back_as_written() {
        for text in ["2.0.0", "4.4.7", "5.1.1", "5.100.999"] {
            let code = EnhancedCode::parse(text).unwrap();
            assert_eq!(code.to_string(), text);
        }
        assert_eq!(EnhancedCode::LOOP.to_string(), "5.4.6");
    }

    #[test]
    fn anything_but_a_code_is_refused() {
        for text in [
            "", "2", "2.0", "3.0.0", "2.0.0.0", "2..0", "2.1000.0", "2.a.0", "25.0.0", "+2.0.0",
        ] {
            assert_eq!(EnhancedCode::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn every_status_carries_its_code() {
        assert_eq!(DeliveryStatus::DELIVERED.code().to_string(), "2.0.0");
        assert_eq!(DeliveryStatus::DELIVERED.diagnostic(), "");
        let later = DeliveryStatus::system_temporary("exit 75");
        assert_eq!(
            (later.code().to_string().as_str(), later.diagnostic()),
            ("4.3.0", "exit 75")
        );
    }
}
