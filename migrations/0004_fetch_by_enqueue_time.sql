-- The producer's fetch, in the order jobs became ready (Hangfire's FIFO): by the time a job
-- entered its queue (`updated_at` is set by every transition to enqueued), then id.
--
-- The old index on (queue, id) let the planner serve `ORDER BY id` from the primary key
-- instead, and with statistics from a burst (all rows enqueued) it did: every fetch then walked
-- past every job already taken, and a burst of N jobs cost O(N²). The primary key cannot give
-- this order, so the fetch always takes the partial index, which holds enqueued jobs only.
DROP INDEX jobs_enqueued_by_queue;
CREATE INDEX jobs_ready ON jobs (queue, updated_at, id) WHERE state = 'enqueued';
