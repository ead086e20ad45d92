"""Unit tests of consumer.retry: backoff bounds, policy validation and error classification."""

from __future__ import annotations

import random

import asyncpg
import pydantic
import pytest

from consumer import errors
from consumer.dead_letters import DeadLetterWriteError
from consumer.retry import ErrorClass, RetryPolicy, classify, is_infrastructure

pytestmark = pytest.mark.unit

POLICY = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, max_backoff_s=4.0)


class EdgeRandom(random.Random):
    """A random source whose uniform(a, b) always returns one end of the range."""

    def __init__(self, upper: bool) -> None:
        super().__init__()
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


@pytest.mark.parametrize(
    ("attempt", "ceiling_s"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (40, 4.0)],
)
def test_backoff_within_upper_half_of_ceiling(attempt: int, ceiling_s: float) -> None:
    lowest = POLICY.backoff_s(attempt, rng=EdgeRandom(upper=False))
    highest = POLICY.backoff_s(attempt, rng=EdgeRandom(upper=True))
    sampled = [POLICY.backoff_s(attempt, rng=random.Random(seed)) for seed in range(200)]

    assert lowest == pytest.approx(ceiling_s / 2)
    assert highest == pytest.approx(ceiling_s)
    assert all(ceiling_s / 2 <= delay <= ceiling_s for delay in sampled)
    assert len(set(sampled)) > 1


def test_backoff_zero_when_initial_zero() -> None:
    policy = RetryPolicy(initial_backoff_s=0.0)

    assert policy.backoff_s(3, rng=random.Random(1)) == 0.0


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"initial_backoff_s": -0.1},
        {"max_backoff_s": -1.0},
    ],
)
def test_policy_rejects_invalid_values(arguments: dict[str, float]) -> None:
    with pytest.raises(errors.HandlerRegistrationError):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


def test_policy_accepts_single_attempt() -> None:
    assert RetryPolicy(max_attempts=1).max_attempts == 1


def validation_error() -> pydantic.ValidationError:
    class Model(pydantic.BaseModel):
        number: int

    try:
        Model.model_validate({"number": "x"})
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("validation did not fail")


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.LockNotAvailableError("lock timeout"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.PostgresConnectionError("connection failure"),
        ConnectionResetError("reset by peer"),
        ConnectionRefusedError("refused"),
        errors.InfrastructureError("broker unreachable"),
        DeadLetterWriteError("dead_letters not writable"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_classify_infrastructure(exc: BaseException) -> None:
    assert is_infrastructure(exc)
    assert classify(exc, RetryPolicy()) is ErrorClass.INFRASTRUCTURE


def test_classify_detached_pool_connection_as_infrastructure() -> None:
    """The error asyncpg raises on a pool connection after the server closed it is a lost connection."""
    # asyncpg 0.32 detaches a pool connection's proxy when the connection is
    # lost, and any later call on it raises this InterfaceError.
    exc = asyncpg.InterfaceError("cannot call Connection.execute(): connection has been released back to the pool")

    assert classify(exc, RetryPolicy()) is ErrorClass.INFRASTRUCTURE


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("no stock"),
        RuntimeError("boom"),
        KeyError("missing"),
        TimeoutError(),
        asyncpg.UniqueViolationError("duplicate key value"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_classify_retriable(exc: BaseException) -> None:
    assert classify(exc, RetryPolicy()) is ErrorClass.RETRIABLE


@pytest.mark.parametrize(
    "exc",
    [
        errors.PermanentError("refund of an unknown order"),
        errors.DecodeError("not JSON"),
        errors.DecodeError("bad field", reason="validation"),
        validation_error(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_classify_permanent(exc: BaseException) -> None:
    assert classify(exc, RetryPolicy()) is ErrorClass.PERMANENT


def test_classify_give_up_on_type_permanent() -> None:
    policy = RetryPolicy(give_up_on=(KeyError,))

    assert classify(KeyError("x"), policy) is ErrorClass.PERMANENT
    assert classify(ValueError("x"), policy) is ErrorClass.RETRIABLE


def test_infrastructure_wins_over_give_up_on() -> None:
    policy = RetryPolicy(give_up_on=(ConnectionError,))

    assert classify(ConnectionResetError("reset"), policy) is ErrorClass.INFRASTRUCTURE
