"""SecAgg+ state machines (common/secagg/protocol.py), driven in-process without a transport."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medfed.common.secagg import protocol as P
from medfed.common.secagg.identity import KeyAuthenticationError, sign_keys, simulation_roster
from medfed.common.secagg.masks import generate_keypair, public_bytes
from medfed.common.secagg.quantize import QuantParams, error_bound

NODES = (11, 22, 33, 44, 55)
DIM = 64
RUN = 7


def make(threshold=3, server_round=2, neighbours=None, nodes=NODES):
    roster, identities = simulation_roster(nodes)
    quant = QuantParams.auto(len(nodes), max_weight=1000.0, clip=1.0)
    config = P.ProtocolConfig(
        RUN, server_round, threshold, DIM, quant, frozenset(nodes), neighbours
    )
    sites = {n: P.SiteSession(n, identities[n], roster, config) for n in nodes}
    return config, roster, identities, sites, P.ServerSession(config, roster)


def data(nodes=NODES, seed=0):
    rng = np.random.default_rng(seed)
    updates = {n: rng.uniform(-1, 1, DIM) for n in nodes}
    weights = {n: float(rng.integers(1, 1000)) for n in nodes}
    return updates, weights


def plain_average(updates, weights, nodes):
    total = sum(weights[n] for n in nodes)
    return sum(weights[n] * updates[n] for n in nodes) / total, total


def run_round(sites, server, updates, weights, *, skip_shares=(), skip_masked=(), skip_unmask=()):
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    broadcast = server.key_broadcast()
    for n, bundles in broadcast.items():
        if n not in skip_shares:
            server.receive_shares(sites[n].share_keys(bundles))
    routed = server.route_shares()
    for n, message in routed.items():
        if n not in skip_masked:
            server.receive_masked(sites[n].masked_input(updates[n], weights[n], message))
    requests = server.unmask_requests()
    for n, request in requests.items():
        if n not in skip_unmask:
            server.receive_unmask(sites[n].unmask(request))
    return server.finish()


def check(result, config, updates, weights, summed):
    expected, total = plain_average(updates, weights, summed)
    assert result.survivors == frozenset(summed)
    assert result.total_weight == pytest.approx(total, abs=len(summed) / config.quant.scale * 2)
    bound = error_bound(config.quant, result.total_weight, num_summed=len(summed))
    assert np.max(np.abs(result.average - expected)) <= bound


def test_all_honest():
    config, _, _, sites, server = make()
    updates, weights = data()
    result = run_round(sites, server, updates, weights)
    check(result, config, updates, weights, NODES)
    assert result.dropped == frozenset()


def test_sparse_graph_ring():
    ring = {n: (NODES[i - 1], NODES[(i + 1) % 5]) for i, n in enumerate(NODES)}
    config, _, _, sites, server = make(threshold=2, neighbours=ring)
    updates, weights = data(seed=1)
    check(run_round(sites, server, updates, weights), config, updates, weights, NODES)


def test_drop_after_masking_recovered_from_others_seed_shares():
    config, _, _, sites, server = make()
    updates, weights = data(seed=2)
    result = run_round(sites, server, updates, weights, skip_unmask={33})
    check(result, config, updates, weights, NODES)  # 33's update is in the sum


def test_drop_before_masking_pairwise_masks_removed():
    config, _, _, sites, server = make()
    updates, weights = data(seed=3)
    result = run_round(sites, server, updates, weights, skip_masked={44})
    rest = [n for n in NODES if n != 44]
    check(result, config, updates, weights, rest)
    assert result.dropped == frozenset({44})


def test_drop_before_sharing_and_before_masking():
    config, _, _, sites, server = make()
    updates, weights = data(seed=4)
    result = run_round(sites, server, updates, weights, skip_shares={11}, skip_masked={22})
    check(result, config, updates, weights, [33, 44, 55])
    assert result.dropped == frozenset({22})


def test_too_few_masked_vectors_abort():
    _, _, _, sites, server = make(threshold=4)
    updates, weights = data()
    with pytest.raises(P.RoundAborted, match="masked vectors"):
        run_round(sites, server, updates, weights, skip_masked={11, 22})


def test_too_few_unmask_answers_abort():
    _, _, _, sites, server = make(threshold=4)
    updates, weights = data()
    with pytest.raises(P.RoundAborted, match="fewer than t=4"):
        run_round(sites, server, updates, weights, skip_unmask={11, 22})


def test_swapped_public_key_caught_before_any_share(monkeypatch):
    sealed = []
    monkeypatch.setattr(P, "seal_payload", lambda *a: sealed.append(a) or b"")
    monkeypatch.setattr(P, "split_secret", lambda *a: sealed.append(a) or [])
    _, _, _, sites, server = make()
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    broadcast = server.key_broadcast()
    forged = dataclasses.replace(broadcast[11][33], mask_public=public_bytes(generate_keypair()))
    relayed = dict(broadcast[11])
    relayed[33] = forged
    with pytest.raises(KeyAuthenticationError, match="node 33") as info:
        sites[11].share_keys(relayed)
    assert info.value.node_id == 33
    assert sealed == []  # nothing split, nothing encrypted
    with pytest.raises(P.ProtocolError, match="ABORTED"):
        sites[11].share_keys(broadcast[11])


def test_keys_signed_by_server_for_another_node_rejected():
    _, _, _, sites, server = make()
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    broadcast = server.key_broadcast()
    relayed = dict(broadcast[22])
    relayed[33] = dataclasses.replace(broadcast[22][44], node_id=33)
    with pytest.raises(KeyAuthenticationError):
        sites[22].share_keys(relayed)


def test_bundle_from_previous_round_rejected():
    config, roster, identities, sites, server = make(server_round=5)
    old = P.SiteSession(33, identities[33], roster, dataclasses.replace(config, server_round=4))
    old_bundle = old.setup()
    with pytest.raises(P.ProtocolError, match="replayed"):
        server.receive_keys(old_bundle)
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    broadcast = server.key_broadcast()
    relayed = dict(broadcast[11])
    relayed[33] = old_bundle
    with pytest.raises(KeyAuthenticationError, match="replayed") as info:
        sites[11].share_keys(relayed)
    assert info.value.node_id == 33


def test_server_rejects_replay_unknown_site_and_bad_length():
    _, _, _, sites, server = make()
    updates, weights = data()
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    _, stranger_ids = simulation_roster([99])
    stranger = sign_keys(
        stranger_ids[99],
        99,
        RUN,
        2,
        public_bytes(generate_keypair()),
        public_bytes(generate_keypair()),
    )
    with pytest.raises(P.ProtocolError, match="not in this round"):
        server.receive_keys(stranger)
    broadcast = server.key_broadcast()
    messages = {n: sites[n].share_keys(b) for n, b in broadcast.items()}
    with pytest.raises(P.ProtocolError, match="replayed"):
        server.receive_shares(dataclasses.replace(messages[11], server_round=1))
    for m in messages.values():
        server.receive_shares(m)
    routed = server.route_shares()
    masked = {n: sites[n].masked_input(updates[n], weights[n], r) for n, r in routed.items()}
    with pytest.raises(P.ProtocolError, match="shape"):
        server.receive_masked(dataclasses.replace(masked[11], vector=masked[11].vector[:-1]))
    with pytest.raises(P.ProtocolError, match="replayed"):
        server.receive_masked(dataclasses.replace(masked[11], run_id=RUN + 1))
    server.receive_masked(masked[11])
    with pytest.raises(P.ProtocolError, match="duplicate"):
        server.receive_masked(masked[11])


def _to_unmask_stage(sites, server, updates, weights):
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    for n, b in server.key_broadcast().items():
        server.receive_shares(sites[n].share_keys(b))
    for n, r in server.route_shares().items():
        server.receive_masked(sites[n].masked_input(updates[n], weights[n], r))
    return server.unmask_requests()


def test_site_refuses_seed_and_key_share_of_same_node():
    _, _, _, sites, server = make()
    updates, weights = data()
    requests = _to_unmask_stage(sites, server, updates, weights)
    greedy = dataclasses.replace(requests[11], dropped=frozenset({22}))
    with pytest.raises(P.UnmaskRefused, match=r"both.*\[22\]"):
        sites[11].unmask(greedy)
    with pytest.raises(P.ProtocolError):  # aborted: no second chance
        sites[11].unmask(requests[11])
    # A site answers once: a second request cannot obtain the other share.
    sites[22].unmask(requests[22])
    other = dataclasses.replace(
        requests[22], survivors=frozenset({22, 44, 55}), dropped=frozenset({11, 33})
    )
    with pytest.raises(P.ProtocolError, match="DONE"):
        sites[22].unmask(other)


def test_site_refuses_too_few_survivors_and_being_dropped():
    _, _, _, sites, server = make()
    updates, weights = data()
    requests = _to_unmask_stage(sites, server, updates, weights)
    few = dataclasses.replace(
        requests[11], survivors=frozenset({11, 22}), dropped=frozenset({33, 44, 55})
    )
    with pytest.raises(P.UnmaskRefused, match="threshold"):
        sites[11].unmask(few)
    me_dropped = dataclasses.replace(
        requests[22], survivors=frozenset({33, 44, 55}), dropped=frozenset({11, 22})
    )
    with pytest.raises(P.UnmaskRefused, match="survivor"):
        sites[22].unmask(me_dropped)


def test_tampered_share_ciphertext_aborts_site():
    _, _, _, sites, server = make()
    updates, weights = data()
    for bundle in [s.setup() for s in sites.values()]:
        server.receive_keys(bundle)
    for n, b in server.key_broadcast().items():
        server.receive_shares(sites[n].share_keys(b))
    routed = server.route_shares()
    blobs = dict(routed[11].ciphertexts)
    blobs[22] = blobs[22][:-1] + bytes([blobs[22][-1] ^ 1])
    with pytest.raises(P.ProtocolError, match="node 22") as info:
        sites[11].masked_input(
            updates[11], weights[11], dataclasses.replace(routed[11], ciphertexts=blobs)
        )
    assert info.value.node_id == 22


def test_config_validation():
    quant = QuantParams.auto(5, 1000.0, 1.0)
    nodes = frozenset(NODES)
    with pytest.raises(ValueError, match="threshold"):
        P.ProtocolConfig(RUN, 1, 1, DIM, quant, nodes)
    with pytest.raises(ValueError, match="threshold"):
        P.ProtocolConfig(RUN, 1, 6, DIM, quant, nodes)
    ring = {n: (NODES[i - 1], NODES[(i + 1) % 5]) for i, n in enumerate(NODES)}
    with pytest.raises(ValueError, match="threshold"):
        P.ProtocolConfig(RUN, 1, 4, DIM, quant, nodes, ring)
    with pytest.raises(ValueError, match="symmetric"):
        P.ProtocolConfig(RUN, 1, 2, DIM, quant, nodes, ring | {11: (22, 33)})
    with pytest.raises(ValueError, match="num_sites"):
        P.ProtocolConfig(RUN, 1, 3, DIM, QuantParams.auto(3, 1000.0, 1.0), nodes)
    config = P.ProtocolConfig(RUN, 1, 5, DIM, quant, nodes)
    assert config.peers(11) == nodes - {11} and config.vector_length == DIM + 1
