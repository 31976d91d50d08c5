//! The read side when parts of it fail: NATS or Redis down, a relay or a
//! projector killed mid-way. (Tests to be written.)
