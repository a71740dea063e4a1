//! Beam identities: `AppId` (`app.proxy.broker`) and `ProxyId` (`proxy.broker`), their syntax and
//! the "may sign for" rule of API.md.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid id; the message names the id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid id {id:?}: each dot-separated label must be non-empty and use only A-Z, a-z, 0-9 and '-'")]
    BadLabel { id: String },
    #[error("invalid id {id:?}: expected {expected}")]
    WrongShape { id: String, expected: &'static str },
}

fn check_labels(s: &str) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdError::BadLabel { id: s.to_owned() })
    }
}

/// "A may sign for B": B == A, or B ends with `.` + A (label boundary).
pub fn may_sign_for(signer: &str, subject: &str) -> bool {
    subject == signer
        || (subject.len() > signer.len()
            && subject.ends_with(signer)
            && subject.as_bytes()[subject.len() - signer.len() - 1] == b'.')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $min_labels:expr, $expected:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks syntax only (labels and their count); see `within` for the broker id.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_labels(s)?;
                if s.split('.').count() < $min_labels {
                    return Err(IdError::WrongShape { id: s.to_owned(), expected: $expected });
                }
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// An application: `app.proxy.<broker id>`.
    AppId, 3, "an AppId like app1.proxy1.broker"
);
id_type!(
    /// A site's proxy: `proxy.<broker id>`.
    ProxyId, 2, "a ProxyId like proxy1.broker"
);

impl AppId {
    /// The proxy this app lives behind: everything after the first label.
    pub fn proxy_id(&self) -> ProxyId {
        let (_, rest) = self.0.split_once('.').expect("parse guarantees three labels");
        ProxyId(Arc::from(rest))
    }

    /// The app's own label.
    pub fn app_label(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(app, _)| app)
    }

    /// Checks that this app belongs to the federation of `broker_id` (exactly `app.proxy.broker`).
    pub fn within(&self, broker_id: &str) -> Result<(), IdError> {
        self.proxy_id().within(broker_id).map_err(|_| IdError::WrongShape {
            id: self.to_string(),
            expected: "an AppId of the form <app>.<proxy>.<broker id>",
        })
    }
}

impl ProxyId {
    /// Builds `label.broker_id`.
    pub fn from_parts(label: &str, broker_id: &str) -> Result<Self, IdError> {
        Self::parse(&format!("{label}.{broker_id}"))
    }

    /// Checks that this proxy is exactly one label under `broker_id`.
    pub fn within(&self, broker_id: &str) -> Result<(), IdError> {
        match self.0.split_once('.') {
            Some((_, rest)) if rest == broker_id => Ok(()),
            _ => {
                Err(IdError::WrongShape { id: self.to_string(), expected: "a ProxyId of the form <proxy>.<broker id>" })
            }
        }
    }

    /// The app id `label.<this proxy>`.
    pub fn app(&self, label: &str) -> Result<AppId, IdError> {
        AppId::parse(&format!("{label}.{self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(AppId::parse("app1.proxy1.broker").is_ok());
        assert!(AppId::parse("app1.proxy1").is_err());
        assert!(AppId::parse("app1..broker").is_err());
        assert!(AppId::parse("app_1.proxy1.broker").is_err());
        assert!(AppId::parse("").is_err());
        assert!(ProxyId::parse("proxy1.broker").is_ok());
        let err = AppId::parse("a b.c.d").unwrap_err().to_string();
        assert!(err.contains("a b.c.d"), "{err}");
    }

    #[test]
    fn proxy_of_app_and_broker_membership() {
        let app = AppId::parse("app1.proxy1.broker.example.org").unwrap();
        assert_eq!(app.proxy_id().as_str(), "proxy1.broker.example.org");
        assert_eq!(app.app_label(), "app1");
        assert!(app.within("broker.example.org").is_ok());
        assert!(app.within("example.org").is_err());
        assert!(ProxyId::parse("p.broker").unwrap().within("broker").is_ok());
        assert!(ProxyId::parse("p.q.broker").unwrap().within("broker").is_err());
    }

    #[test]
    fn signing_respects_label_boundary() {
        assert!(may_sign_for("ulm.broker", "ulm.broker"));
        assert!(may_sign_for("ulm.broker", "app.ulm.broker"));
        assert!(!may_sign_for("ulm.broker", "neu-ulm.broker"));
        assert!(!may_sign_for("ulm.broker", "app.neu-ulm.broker"));
        assert!(!may_sign_for("app.ulm.broker", "ulm.broker"));
    }

    #[test]
    fn serde_names_the_bad_id() {
        let err = serde_json::from_str::<AppId>("\"bad id!\"").unwrap_err().to_string();
        assert!(err.contains("bad id!"), "{err}");
    }
}
