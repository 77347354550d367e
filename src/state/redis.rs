//! The Redis state store, shared by every instance that names the same server.
//!
//! Each decision is one Lua script (atomic on the server, and one round trip): the greylist
//! step and the HELO history follow `logic` step by step, on the Redis server's clock (`TIME`)
//! so that instances whose clocks differ still agree. Every key carries a TTL; the questions
//! the thread has at once go out in one pipeline. Connecting and every answer are bounded by
//! HELOGUARD_STATE_TIMEOUT_MS.
//!
//! When the server fails, the store is down: questions are answered unavailable at once (no
//! wait), a reconnect is tried at most every [`RECONNECT_PAUSE`], and the outage is logged
//! once when it starts and once when it ends. The URL's password is never logged: the logs
//! name the store by host, port and database only.

use std::io;
use std::time::{Duration, Instant};

use ::redis::{Client, Connection, ErrorKind, ServerErrorKind, Value};
use log::{info, warn};

use super::logic::{CHURN_NAMES_KEPT, CHURN_WINDOW_MS, millis, triplet_key};
use super::{StateBackend, StateQuery, StateReply, StoreError};
use crate::greylist::{GreylistOutcome, GreylistTimes};
use crate::helo::sender::ChurnOutcome;

/// A store that failed is retried no sooner than this.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Greylist triplets: `heloguard:g:` + `logic::triplet_key`.
const GREYLIST_PREFIX: &str = "heloguard:g:";
/// HELO histories: `heloguard:h:` + the client (`logic::churn_client`).
const CHURN_PREFIX: &str = "heloguard:h:";

/// `logic::greylist_step`. KEYS[1] the triplet; ARGV delay, retry, pass (ms). The value is
/// `FIRST_SEEN:PASSED:LAST_USE`. Returns {outcome, retry_after_ms}: 0 new, 1 early, 2 passed,
/// 3 known.
const GREYLIST_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay, retry, pass = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('GET', KEYS[1])
if v then
  local first, passed, last = string.match(v, '^(%d+):([01]):(%d+)$')
  first = tonumber(first)
  last = tonumber(last)
  if first and last then
    if passed == '1' then
      if now - last <= pass then
        redis.call('SET', KEYS[1], string.format('%.0f:1:%.0f', first, now), 'PX', pass)
        return {3, 0}
      end
    else
      local elapsed = now - first
      if elapsed < 0 then elapsed = 0 end
      if elapsed < delay then
        return {1, delay - elapsed}
      end
      if elapsed <= retry then
        redis.call('SET', KEYS[1], string.format('%.0f:1:%.0f', first, now), 'PX', pass)
        return {2, 0}
      end
    end
  end
end
redis.call('SET', KEYS[1], string.format('%.0f:0:%.0f', now, now), 'PX', retry)
return {0, delay}
";

/// `logic::record_helo`. KEYS[1] the client's history (a sorted set, name by last seen);
/// ARGV name, window (ms), names kept. Returns the distinct names within the window.
const CHURN_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%.0f', now - window))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 1))
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
";

/// The scripts' SHA1s once loaded on a connection.
struct Loaded {
    greylist: String,
    churn: String,
}

pub(crate) struct RedisStore {
    client: Client,
    /// HOST:PORT/DB: what the logs call the store.
    shown: String,
    timeout: Duration,
    times: GreylistTimes,
    connection: Option<(Connection, Loaded)>,
    /// When the current outage began (logged once).
    down_since: Option<Instant>,
    last_attempt: Option<Instant>,
}

impl RedisStore {
    /// Checks the URL; connects on first use.
    pub(crate) fn new(
        url: &str,
        shown: String,
        timeout: Duration,
        times: GreylistTimes,
    ) -> io::Result<Self> {
        let client = Client::open(url).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("redis://{shown}: {}", e.category()),
            )
        })?;
        Ok(Self {
            client,
            shown,
            timeout,
            times,
            connection: None,
            down_since: None,
            last_attempt: None,
        })
    }

    fn connect(&self) -> Result<(Connection, Loaded), ::redis::RedisError> {
        let mut con = self.client.get_connection_with_timeout(self.timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        let load = |script: &str, con: &mut Connection| -> Result<String, ::redis::RedisError> {
            ::redis::cmd("SCRIPT").arg("LOAD").arg(script).query(con)
        };
        let loaded = Loaded {
            greylist: load(GREYLIST_SCRIPT, &mut con)?,
            churn: load(CHURN_SCRIPT, &mut con)?,
        };
        Ok((con, loaded))
    }

    /// The live connection, connecting when the pause since the last failure is over.
    fn connected(&mut self) -> Result<&mut (Connection, Loaded), StoreError> {
        if self.connection.is_none() {
            if self
                .last_attempt
                .is_some_and(|at| at.elapsed() < RECONNECT_PAUSE)
            {
                return Err(StoreError::Down);
            }
            self.last_attempt = Some(Instant::now());
            match self.connect() {
                Ok(c) => self.connection = Some(c),
                Err(e) => {
                    self.outage(&e);
                    return Err(StoreError::Redis(e));
                }
            }
        }
        self.connection.as_mut().ok_or(StoreError::Down)
    }

    fn outage(&mut self, e: &::redis::RedisError) {
        self.connection = None;
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            warn!(
                "state store redis://{} is unavailable ({}): greylisting and helo_churn fail \
                 open until it is back",
                self.shown,
                describe(e)
            );
        }
    }

    fn run(&mut self, queries: &[StateQuery]) -> Result<Vec<Value>, StoreError> {
        let times = self.times;
        let first_try = {
            let (con, loaded) = self.connected()?;
            let pipe = pipeline(times, queries, loaded);
            pipe.query::<Vec<Value>>(con)
        };
        let result = match first_try {
            // The server lost its script cache (SCRIPT FLUSH, a restart behind a proxy):
            // load them again and retry once.
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.connection = None;
                self.last_attempt = None;
                let (con, loaded) = self.connected()?;
                let pipe = pipeline(times, queries, loaded);
                pipe.query::<Vec<Value>>(con)
            }
            other => other,
        };
        match result {
            Ok(values) => {
                if let Some(since) = self.down_since.take() {
                    info!(
                        "state store redis://{} is back after {} s",
                        self.shown,
                        since.elapsed().as_secs()
                    );
                }
                Ok(values)
            }
            Err(e) => {
                self.outage(&e);
                Err(StoreError::Redis(e))
            }
        }
    }
}

/// One EVALSHA per question, in order.
fn pipeline(times: GreylistTimes, queries: &[StateQuery], loaded: &Loaded) -> ::redis::Pipeline {
    let mut pipe = ::redis::pipe();
    let (delay, retry, pass) = (millis(times.delay), millis(times.retry), millis(times.pass));
    for query in queries {
        match query {
            StateQuery::Greylist(triplet) => {
                pipe.cmd("EVALSHA")
                    .arg(&loaded.greylist)
                    .arg(1)
                    .arg(format!("{GREYLIST_PREFIX}{}", triplet_key(triplet)))
                    .arg(delay)
                    .arg(retry)
                    .arg(pass);
            }
            StateQuery::Churn { client, name } => {
                pipe.cmd("EVALSHA")
                    .arg(&loaded.churn)
                    .arg(1)
                    .arg(format!("{CHURN_PREFIX}{client}"))
                    .arg(name)
                    .arg(CHURN_WINDOW_MS)
                    .arg(CHURN_NAMES_KEPT);
            }
        }
    }
    pipe
}

/// What a failure was, without anything of the URL in it.
fn describe(e: &::redis::RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "connection lost".into()
    } else {
        e.category().to_string()
    }
}

/// One script's answer as the store's reply.
fn reply_of(query: &StateQuery, value: &Value) -> Result<StateReply, StoreError> {
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let unexpected = || StoreError::Unexpected(format!("{value:?}"));
    match query {
        StateQuery::Greylist(_) => {
            let Value::Array(items) = value else {
                return Err(unexpected());
            };
            let (Some(code), Some(wait)) =
                (items.first().and_then(int), items.get(1).and_then(int))
            else {
                return Err(unexpected());
            };
            let retry_after = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
            let outcome = match code {
                0 => GreylistOutcome::New { retry_after },
                1 => GreylistOutcome::Early { retry_after },
                2 => GreylistOutcome::Passed,
                3 => GreylistOutcome::Known,
                _ => return Err(unexpected()),
            };
            Ok(StateReply::Greylist(outcome))
        }
        StateQuery::Churn { name, .. } => {
            let count = int(value).ok_or_else(unexpected)?;
            Ok(StateReply::Churn {
                name: name.clone(),
                outcome: ChurnOutcome::DistinctNames(u32::try_from(count).unwrap_or(u32::MAX)),
            })
        }
    }
}

impl StateBackend for RedisStore {
    fn answer(&mut self, queries: &[StateQuery]) -> Result<Vec<StateReply>, StoreError> {
        let values = self.run(queries)?;
        if values.len() != queries.len() {
            return Err(StoreError::Unexpected(format!(
                "{} answers to {} questions",
                values.len(),
                queries.len()
            )));
        }
        queries
            .iter()
            .zip(&values)
            .map(|(q, v)| reply_of(q, v))
            .collect()
    }

    /// Connects when not connected: at the thread's start, so that a store down at startup
    /// is logged then rather than at the first question, and when idle, so that the end of an
    /// outage is seen before a session waits on it.
    fn tick(&mut self) {
        if self.connection.is_none() {
            let _ = self.connected();
        }
    }

    fn close(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::greylist::{GreylistClient, Triplet};

    fn greylist() -> StateQuery {
        StateQuery::Greylist(Triplet {
            client: GreylistClient::Network("192.0.2.0".parse().expect("ip")),
            sender: String::new(),
            recipient: "r@example.org".into(),
        })
    }

    #[test]
    fn script_answers_become_replies() {
        let answer = Value::Array(vec![Value::Int(1), Value::Int(1500)]);
        assert_eq!(
            reply_of(&greylist(), &answer).expect("reply"),
            StateReply::Greylist(GreylistOutcome::Early {
                retry_after: Duration::from_millis(1500)
            })
        );
        let churn = StateQuery::Churn {
            client: "192.0.2.1".into(),
            name: "a.example".into(),
        };
        assert_eq!(
            reply_of(&churn, &Value::Int(6)).expect("reply"),
            StateReply::Churn {
                name: "a.example".into(),
                outcome: ChurnOutcome::DistinctNames(6)
            }
        );
        assert!(reply_of(&churn, &Value::Nil).is_err());
        assert!(
            reply_of(
                &greylist(),
                &Value::Array(vec![Value::Int(9), Value::Int(0)])
            )
            .is_err()
        );
    }

    #[test]
    fn a_store_that_is_not_there_is_down_without_waiting_again() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused.
        let mut store = RedisStore::new(
            "redis://127.0.0.1:9/0",
            "127.0.0.1:9/0".into(),
            Duration::from_millis(200),
            GreylistTimes::default(),
        )
        .expect("store");
        store.tick();
        assert!(store.down_since.is_some());
        assert!(matches!(store.answer(&[greylist()]), Err(StoreError::Down)));
    }
}
