"""DirectCalls: the scripts' fast path to Redis behaves like the client (replies, errors, broken connections,
timeouts, its connection limit) on the private test server."""

from __future__ import annotations

import threading

import pytest
import redis

from appliance.redis_conn import DirectCalls, connect


def connection_names(client: redis.Redis) -> list[str]:
    return [c["name"] for c in client.client_list()]


def test_replies_and_errors_as_the_client_gives_them(client: redis.Redis) -> None:
    direct = DirectCalls(client)
    assert direct.execute("SET", "k", "v") == "OK"
    assert direct.execute("GET", "k") == "v", "replies are decoded like the client's"
    assert direct.execute("HSET", "h", "a", 1, "b", b"2") == 2
    assert direct.execute("HGETALL", "h") == ["a", "1", "b", "2"], "raw replies: no client-side callbacks"
    with pytest.raises(redis.exceptions.NoScriptError):
        direct.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        direct.execute("LPUSH", "k", "x")
    assert direct.execute("GET", "k") == "v", "a refusal leaves the connection usable"
    assert direct._open == 1 and len(direct._idle) == 1, "one caller at a time needs one connection"


def test_a_broken_connection_is_resent_once_on_a_fresh_one(client: redis.Redis, redis_server: str) -> None:
    direct = DirectCalls(connect(redis_server))
    direct.execute("CLIENT", "SETNAME", "direct-under-test")
    assert "direct-under-test" in connection_names(client)
    client.client_kill_filter(_type="normal", skipme=True)  # what a Redis restart does to open connections
    assert direct.execute("INCR", "n") == 1, "sent again on a new connection"
    assert client.get("n") == "1", "and run once"
    assert "direct-under-test" not in connection_names(client)


def test_a_timeout_is_not_resent_and_drops_the_connection(client: redis.Redis, redis_server: str) -> None:
    direct = DirectCalls(connect(redis_server, timeout_s=0.2))
    direct.execute("PING")
    with pytest.raises(redis.TimeoutError):
        direct.execute("EVAL", "redis.call('INCR', KEYS[1]) local t = redis.call('TIME') "
                               "local stop = t[1] * 1e6 + t[2] + 400000 "
                               "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > stop return 1", 1, "n")
    assert direct._open == 0 and not direct._idle, "a connection that timed out mid-reply is closed"
    assert direct.execute("GET", "n") == "1", "the slow script ran once, and the next call works"


def test_above_the_pool_size_calls_go_through_the_client(client: redis.Redis, redis_server: str) -> None:
    direct = DirectCalls(connect(redis_server, max_connections=1))
    busy = threading.Thread(target=direct.execute, args=("BLPOP", "never", 1))
    busy.start()
    try:
        deadline = threading.Event()
        while direct._open < 1:
            deadline.wait(0.01)
        client.set("k", "v")
        assert direct.execute("GET", "k") == "v", "served by the client's own pool"
        assert direct._open == 1
    finally:
        busy.join()
    assert direct._open == 1 and len(direct._idle) == 1
