-- Replies live in streams of their own (stream_type 'reply', one per reply); each
-- reply event names its conversation in its payload. A conversation's live feed
-- (SSE resuming from Last-Event-ID) reads its replies' events through this
-- index: only reply rows are in it, so appends of other streams do not pay for it.
CREATE INDEX events_reply_conversation_idx
    ON events ((data->>'conversation_id'), transaction_id, global_position)
    WHERE stream_type = 'reply';
