"""The Python client against the real server: write, read, explain, a policy denial with
its reason, erasure, bad input and deadlines."""

import hashlib
import itertools
import time

import grpc
import numpy as np
import pytest

from featurestore import Client, FeatureStoreError, WriteRow
from featurestore.v1 import featurestore_pb2 as pb

# Each test uses users of its own, so that they share one server.
_users = itertools.count(1000, 100)


def us_adult(client, user_id):
    state = client.set_user_state(
        user_id,
        jurisdiction="US",
        age_band="adult",
        linked_apps=["facebook", "instagram"],
    )
    assert state.generation == 1
    return state


def an_hour_ago():
    return time.time_ns() // 1000 - 3600 * 1_000_000


def chat_row(user_id, surfaces, features, generation=1):
    """A row from AI chat on Facebook an hour ago, made after seeing `generation`."""
    return WriteRow(
        user_id=user_id,
        surfaces=surfaces,
        source="ai_chat",
        origin_app="facebook",
        producer_id="python-tests@v1",
        features=features,
        interaction_time_unix_micros=an_hour_ago(),
        user_state_generation=generation,
    )


def test_written_values_read_back_and_form_matrices(client):
    first = next(_users)
    users = [first, first + 1]
    for user in users:
        us_adult(client, user)
    written = client.write_features(
        [
            chat_row(
                first,
                ["facebook_feed"],
                {
                    "interest_hiking": 0.25,
                    "topic_embedding": [0.5] * 8,
                    "top_topic": "hiking",
                    "conversation_topics": {"hiking": 0.9, "cooking": 0.1},
                },
            ),
            chat_row(first + 1, ["facebook_feed"], {"interest_hiking": 0.75}),
        ]
    )
    assert [verdict.verdict for verdict in written.rows[0]] == ["ALLOW"] * 4
    assert written.rows[1][0].outcomes == {"facebook_feed": "STORED"}

    never_written = first + 2
    result = client.get_features(
        [(first, "facebook_feed"), (first + 1, "facebook_feed"), (never_written, "facebook_feed")],
        ["interest_hiking", "topic_embedding", "top_topic", "conversation_topics"],
        include_event_times=True,
    )
    assert len(result) == 3
    row = result[0]
    assert row.status == "OK"
    assert row.values["interest_hiking"] == 0.25
    assert row.values["topic_embedding"] == [0.5] * 8
    assert row.values["top_topic"] == "hiking"
    assert row.values["conversation_topics"] == pytest.approx({"hiking": 0.9, "cooking": 0.1})
    assert row.event_times_unix_micros["interest_hiking"] > 0
    assert result[1].statuses["top_topic"] == "NOT_FOUND"
    assert result[1].values["top_topic"] is None
    # interest_hiking has a registered default of 0.
    assert result[2].statuses["interest_hiking"] == "DEFAULTED"

    hiking = result.matrix("interest_hiking")
    assert hiking.shape == (3,)
    np.testing.assert_allclose(hiking, [0.25, 0.75, 0.0])
    embeddings = result.matrix("topic_embedding")
    assert embeddings.shape == (3, 8)
    np.testing.assert_allclose(embeddings[0], [0.5] * 8)
    assert np.isnan(embeddings[1]).all(), "no embedding was written for the second user"
    with pytest.raises(TypeError):
        result.matrix("top_topic")


def test_the_policy_refuses_a_value_and_says_why(client):
    user = next(_users)
    us_adult(client, user)
    # A health topic is never stored for ads.
    rows = [chat_row(user, ["facebook_ads"], {"interest_fitness_health": 0.5})]

    explained = client.explain_write(rows)
    verdict = explained.verdicts.rows[0].verdicts[0]
    assert verdict.feature == "interest_fitness_health"
    assert [pb.ReasonCode.Name(reason) for reason in verdict.reasons] == [
        "REASON_CODE_SENSITIVE_TOPIC_FOR_ADS"
    ]
    # Explaining stored nothing.
    written = client.write_features(rows)
    verdict = written.rows[0][0]
    assert verdict.verdict == "DENY"
    assert verdict.reasons == ["SENSITIVE_TOPIC_FOR_ADS"]
    assert verdict.outcomes == {"facebook_ads": "REFUSED"}
    ads = client.get_features([(user, "facebook_ads")], ["interest_fitness_health"])
    assert ads[0].statuses["interest_fitness_health"] == "NOT_FOUND"


def test_a_whole_request_refused_by_the_policy_raises_with_its_reason(client):
    user = next(_users)
    us_adult(client, user)
    # The state moves on to generation 2; a pipeline that saw generation 1 is refused.
    client.set_user_state(user, jurisdiction="US", age_band="adult", ads_objection=True)
    with pytest.raises(FeatureStoreError) as refused:
        client.write_features([chat_row(user, ["facebook_feed"], {"interest_hiking": 0.5})])
    error = refused.value
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.reason == "STALE_GENERATION"
    assert error.metadata["current_generation"] == "2"
    assert error.metadata["row"] == "0"
    assert error.request_id


def test_an_erased_user_is_gone_and_cannot_be_written(client):
    user = next(_users)
    us_adult(client, user)
    client.write_features([chat_row(user, ["facebook_feed"], {"top_topic": "cooking"})])
    assert client.get_features([(user, "facebook_feed")], ["top_topic"])[0].values[
        "top_topic"
    ] == "cooking"

    receipt = client.erase_user(user)
    assert receipt.user_id == user
    assert receipt.verified_at_unix_micros > 0
    assert client.erasure_status(receipt.receipt_id).receipt_id == receipt.receipt_id

    after = client.get_features([(user, "facebook_feed")], ["top_topic"])
    assert after[0].statuses["top_topic"] == "NOT_FOUND"
    with pytest.raises(FeatureStoreError) as refused:
        client.write_features(
            [chat_row(user, ["facebook_feed"], {"top_topic": "cooking"}, generation=0)]
        )
    assert refused.value.reason == "USER_ERASED"


def test_bad_input_is_refused_naming_the_field(client):
    with pytest.raises(FeatureStoreError) as refused:
        client.write_features([chat_row(0, ["facebook_feed"], {"interest_hiking": 0.5})])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in refused.value.message
    with pytest.raises(FeatureStoreError) as refused:
        client.get_features([(1, "facebook_feed")], ["no_such_feature"], request_id="py-bad-7")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_such_feature" in refused.value.message
    assert refused.value.request_id == "py-bad-7"
    with pytest.raises(TypeError):
        chat_row(1, ["facebook_feed"], {"interest_hiking": True}).to_proto()


def test_every_call_has_a_deadline(client):
    with pytest.raises(FeatureStoreError) as late:
        client.get_features([(n, "facebook_feed") for n in range(1, 1001)], timeout=1e-6)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_client_certificate_needs_tls():
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", tls_cert=b"certificate", tls_key=b"key")


def test_tls_with_a_token_or_a_client_certificate(secured_server):
    from conftest import OPERATOR_TOKEN

    address, files = secured_server
    authority = files["ca.pem"].read_bytes()
    with Client(address, tls_ca=authority, token=OPERATOR_TOKEN, timeout=10.0) as with_token:
        user = next(_users)
        us_adult(with_token, user)
        assert with_token.get_features([(user, "facebook_feed")])[0].status == "OK"
        stats = with_token.stats()
        assert "(masked)" in stats.config
        assert hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest() not in stats.config
    with Client(address, tls_ca=authority, token="not-the-token", timeout=10.0) as stranger:
        with pytest.raises(FeatureStoreError) as refused:
            stranger.stats()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(
        address,
        tls_ca=authority,
        tls_cert=files["client.pem"].read_bytes(),
        tls_key=files["client.key"].read_bytes(),
        timeout=10.0,
    ) as with_certificate:
        assert with_certificate.stats().policy_hash
    with Client(address, tls_ca=authority, timeout=10.0) as anonymous:
        with pytest.raises(FeatureStoreError) as refused:
            anonymous.get_features([(1, "facebook_feed")])
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, token=OPERATOR_TOKEN, timeout=2.0) as plaintext:
        with pytest.raises(FeatureStoreError) as refused:
            plaintext.get_features([(1, "facebook_feed")])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
