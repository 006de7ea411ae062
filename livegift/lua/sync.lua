-- sync: one write in a partition and nothing else, so that the WAIT the pipeline sends
-- after it covers every earlier write on that partition's master (the replication offset
-- is the master's). The sweeper runs it in a transfer's source partition before landing
-- the transfer: a debit whose own WAIT failed is then on a replica before any credit.
--
-- KEYS[1] the partition's sync counter
-- Returns the counter.
return redis.call('INCR', KEYS[1])
