//! What every protocol's session core has in common: the requests it asks the gate about, the
//! gate's answers, and the output it hands the driver. A core is a pure state machine over bytes;
//! the driver in `pipeline/` owns the sockets.

use std::ops::Range;

pub use crate::request::Request;

/// A protocol's session core after startup.
///
/// Call contract: feed client bytes to [`Core::on_client`] and server bytes to
/// [`Core::on_server`], each with the whole unconsumed input; write the output's segments in
/// order; drop the consumed prefix; keep the rest for the next call. After
/// [`Progress::Hold`], call [`Core::resolve_hold`] with the final answer and feed the same input
/// again.
pub trait Core {
    /// The protocol's hook on results (masking), since each protocol frames results its own way.
    type Filter: ?Sized;
    type Error;

    /// Client bytes: requests go through `gate`; `to_server` gets what goes upstream.
    fn on_client(
        &mut self,
        input: &[u8],
        gate: &mut dyn Gate,
        to_server: &mut Output,
    ) -> Result<Progress, Self::Error>;

    /// Server bytes: results go through `filter`; `to_client` gets what goes to the client.
    fn on_server(
        &mut self,
        input: &[u8],
        filter: &mut Self::Filter,
        to_client: &mut Output,
    ) -> Result<Progress, Self::Error>;

    /// The final answer for the request a [`Progress::Hold`] stopped at.
    fn resolve_hold(&mut self, disposition: Disposition);

    /// Traffic from the client so far, for the session's live view and its target's counters.
    fn client_traffic(&self) -> Counters;

    /// Traffic from the server so far.
    fn server_traffic(&self) -> Counters;

    /// The transaction state as the server last reported it.
    fn transaction(&self) -> Transaction;

    /// True when the server owes no reply and no transaction is open: a client silent now holds
    /// nothing, and may be ended for idleness.
    fn idle(&self) -> bool;

    /// True when the server owes no reply and no message is half way through in either
    /// direction: the upstream connection can be reset and serve another session.
    fn at_rest(&self) -> bool;

    /// Whether the server told the client itself that it is ending the session (PostgreSQL: a
    /// FATAL ErrorResponse): the driver then adds nothing when the server closes.
    fn server_sent_fatal(&self) -> bool;

    /// Whether `input`, the server bytes not yet fed to [`Core::on_server`], ends inside a
    /// message: the server still owes the rest of it, so reading on cannot wait forever.
    fn server_owes_more(&self, input: &[u8]) -> bool;
}

/// Per-direction traffic counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub bytes: u64,
}

/// A session's transaction, as the server last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction {
    Idle,
    Open,
    /// Open and failed: the server refuses statements until it ends.
    Failed,
}

/// A statement that policy blocked: the rule that fired and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rule: String,
    pub reason: String,
    /// Set when the gateway refused the statement for a failure of its own rather than a rule
    /// (recording failed: 53100, 58030): the client's error carries this SQLSTATE and `reason`
    /// as its message. `None`: 42501, "statement blocked by rule".
    pub sqlstate: Option<&'static str>,
}

/// What the gate decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Allow,
    Block(Blocked),
    /// Hold the session at this message until [`Core::resolve_hold`] is called.
    Hold,
}

/// Decides requests. Called synchronously on the data path, so it must not block.
pub trait Gate {
    fn check(&mut self, request: &Request<'_>) -> Disposition;

    /// A Bind (its whole body): which statement the portal runs, with what parameters. Policy
    /// decided the statement at its Parse; the record stage keeps the parameters for the Execute.
    fn bind(&mut self, _portal: &str, _statement: &str, _body: &[u8]) {}

    /// An Execute of a bound portal: the moment a prepared statement runs. Allowed unless the
    /// gateway cannot let it run (recording failed), or held while its record becomes durable.
    fn execute(&mut self, _portal: &str) -> Disposition {
        Disposition::Allow
    }

    /// COPY FROM STDIN data on its way to the server: a CopyData body, or a piece of one streamed
    /// through. `Err` when it cannot be recorded: a whole message is then replaced by CopyFail, and
    /// a message already partly forwarded ends the session.
    fn copy_data(&mut self, _data: &[u8]) -> Result<(), Blocked> {
        Ok(())
    }

    /// A message the server will answer that no other call stands for, in the order it goes
    /// upstream among the others: with them the record stage knows whose reply each one is.
    fn owed(&mut self, _message: Owed<'_>) {}
}

/// A message the server answers that the gate does not decide (see [`Gate::owed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owed<'a> {
    /// Describe of a portal (`true`: answered for the Execute that follows) or a statement.
    Describe {
        portal: bool,
    },
    Close,
    /// Sync: the end of an extended-protocol batch, answered by ReadyForQuery.
    Sync,
    /// A stand-in for a message the core refused by itself, before any gate call (too large,
    /// or past a per-session limit); `simple`: a Query or FunctionCall.
    Refused {
        simple: bool,
        blocked: &'a Blocked,
    },
}

/// Lets everything through.
pub struct AllowAll;

impl Gate for AllowAll {
    fn check(&mut self, _: &Request<'_>) -> Disposition {
        Disposition::Allow
    }
}

/// One piece of output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// Bytes of the input passed to the call, forwarded as they came.
    Input(Range<usize>),
    /// Bytes the core wrote into [`Output::scratch`].
    Scratch(Range<usize>),
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Input(r) | Seg::Scratch(r) => r.len(),
        }
    }
}

/// What one call produced for one peer.
#[derive(Debug, Default)]
pub struct Output {
    segs: Vec<Seg>,
    scratch: Vec<u8>,
}

impl Output {
    pub fn segments(&self) -> &[Seg] {
        &self.segs
    }

    pub fn scratch(&self) -> &[u8] {
        &self.scratch
    }

    /// Swaps the scratch buffer out (for an owned-buffer write) and back.
    pub fn scratch_mut(&mut self) -> &mut Vec<u8> {
        &mut self.scratch
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn clear(&mut self) {
        self.segs.clear();
        self.scratch.clear();
    }

    /// Appends the whole output, in order, to `into`: `input` is the buffer the call was given.
    pub fn gather(&self, input: &[u8], into: &mut Vec<u8>) {
        let total: usize = self.segs.iter().map(|s| s.len()).sum();
        into.reserve(total);
        for seg in &self.segs {
            match seg {
                Seg::Input(r) => into.extend_from_slice(&input[r.clone()]),
                Seg::Scratch(r) => into.extend_from_slice(&self.scratch[r.clone()]),
            }
        }
    }

    /// When the output is `input` with pieces of it replaced by scratch of the same length (rows
    /// masked in a length-keeping style, such as `partial`), writes those pieces over `input`
    /// and returns the one range of it that is now the whole output; `None`, touching nothing,
    /// when it is not. Every byte it overwrites lies between two input ranges of the output, so
    /// the call had consumed it.
    pub fn patch_into(&self, input: &mut [u8]) -> Option<Range<usize>> {
        let (Some(Seg::Input(first)), Some(Seg::Input(last))) =
            (self.segs.first(), self.segs.last())
        else {
            return None;
        };
        // Where each segment would start if the output were laid over the input from `first`.
        let mut at = first.start;
        for seg in &self.segs {
            match seg {
                Seg::Input(r) if r.start != at => return None,
                seg => at += seg.len(),
            }
        }
        debug_assert_eq!(at, last.end);
        let mut at = first.start;
        for seg in &self.segs {
            if let Seg::Scratch(r) = seg {
                input[at..at + r.len()].copy_from_slice(&self.scratch[r.clone()]);
            }
            at += seg.len();
        }
        Some(first.start..last.end)
    }

    pub(crate) fn pass(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        if let Some(Seg::Input(last)) = self.segs.last_mut()
            && last.end == r.start
        {
            last.end = r.end;
            return;
        }
        self.segs.push(Seg::Input(r));
    }

    /// Removes a scratch segment an `emit` left empty.
    pub(crate) fn drop_empty_scratch(&mut self) {
        if let Some(Seg::Scratch(r)) = self.segs.last()
            && r.is_empty()
        {
            self.segs.pop();
        }
    }

    pub(crate) fn emit(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.scratch.len();
        write(&mut self.scratch);
        let end = self.scratch.len();
        if let Some(Seg::Scratch(last)) = self.segs.last_mut()
            && last.end == start
        {
            last.end = end;
            return;
        }
        self.segs.push(Seg::Scratch(start..end));
    }
}

/// How far a call got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// `consumed` input bytes are handled; keep the rest and read more.
    Continue { consumed: usize },
    /// The gate asked to hold the message that starts at `consumed`.
    Hold { consumed: usize },
    /// The client sent Terminate: write the output, then close both sides.
    Terminate { consumed: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input ranges and rewritten bytes come out in the order the core produced them, whatever
    /// was in the buffer before.
    #[test]
    fn gather_interleaves_input_and_scratch_in_order() {
        let input = b"AAAABBBBCCCC";
        let mut out = Output::default();
        out.pass(0..4);
        out.emit(|o| o.extend_from_slice(b"xx"));
        out.pass(8..12);
        out.emit(|o| o.extend_from_slice(b"yyy"));
        out.emit(|o| o.extend_from_slice(b"z"));
        assert_eq!(out.segments().len(), 4, "adjacent pieces of scratch merge");
        let mut gathered = b"kept:".to_vec();
        out.gather(input, &mut gathered);
        assert_eq!(gathered, b"kept:AAAAxxCCCCyyyz");
    }

    /// Scratch that stands for input of its own length is written over it, and the output
    /// becomes one input range with the same bytes the gather gives; any other shape is left
    /// alone.
    #[test]
    fn same_length_rewrites_go_back_over_the_input() {
        let input = b"AAAABBBBCCCCDDEE";
        let mut out = Output::default();
        out.pass(0..4);
        out.emit(|o| o.extend_from_slice(b"bbbb"));
        out.pass(8..12);
        out.emit(|o| o.extend_from_slice(b"dd"));
        out.pass(14..16);
        let mut gathered = Vec::new();
        out.gather(input, &mut gathered);
        let mut patched = input.to_vec();
        let r = out.patch_into(&mut patched).expect("same-length pieces");
        assert_eq!(&patched[r], &gathered[..]);
        assert_eq!(gathered, b"AAAAbbbbCCCCddEE");

        // A shorter or longer piece, scratch at either end, or input out of order: not patched.
        let shapes: [&[Seg]; 4] = [
            &[Seg::Input(0..4), Seg::Scratch(0..3), Seg::Input(8..12)],
            &[Seg::Input(0..4), Seg::Scratch(0..5), Seg::Input(8..12)],
            &[Seg::Scratch(0..4), Seg::Input(4..8)],
            &[Seg::Input(8..12), Seg::Scratch(0..4), Seg::Input(0..4)],
        ];
        for segs in shapes {
            let out = Output {
                segs: segs.to_vec(),
                scratch: b"xxxxx".to_vec(),
            };
            let mut untouched = input.to_vec();
            assert_eq!(out.patch_into(&mut untouched), None, "{segs:?}");
            assert_eq!(untouched, input, "{segs:?}");
        }
    }
}
