"""Between the stages: the records and their validating codec (records.py), their limits in a run (limits.py),
Redis streams with ack-after-write (streams.py), the Redis client and a private local Redis (redis_client.py,
local_redis.py), addresses and listening sockets (network.py) and what `gkd-async inspect` shows (inspection.py).
"""
