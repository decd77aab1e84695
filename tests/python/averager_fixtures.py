"""Fixtures shared by the DecentralizedAverager tests: a small DHT swarm on 127.0.0.1 and a maker
of averagers that are shut down at the end of the test. Import the fixtures by name."""

import pytest

from hivemind_backend import DHT, DecentralizedAverager

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def local_dht(initial_peers=None, **kwargs) -> DHT:
    return DHT(initial_peers, host_maddrs=LOCAL, wait_timeout=1.0, **kwargs)


@pytest.fixture
def swarm():
    """Four DHT peers, the last three bootstrapped from the first."""
    first = local_dht()
    peers = [first] + [local_dht(first.get_visible_maddrs()) for _ in range(3)]
    yield peers
    for peer in peers:
        peer.shutdown()


@pytest.fixture
def averagers():
    """Makes averagers that are shut down at the end of the test."""
    made = []

    def make(*args, **kwargs):
        averager = DecentralizedAverager(*args, **kwargs)
        made.append(averager)
        return averager

    yield make
    for averager in made:
        averager.shutdown()
