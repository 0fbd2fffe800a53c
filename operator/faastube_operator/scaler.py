"""The scaling loop: the active replica sets autoscaled functions' replicas from their
gateways' decisions.

Every ``autoscaling.interval_s`` (2 s), apart from the sweep (whose period is for
slower things) and from kopf's handlers (a loop is not an event):

1. asks the ClusterKopfPeering whether this replica is the active one; a standby asks
   no gateway and writes nothing;
2. lists Workflows and the operator's Deployments (two reads for the whole cluster) and
   plans which gateways to ask (``autoscaling.plan_round``);
3. asks those gateways for ``GET /scale``, all at once, each within ``timeout_s``;
4. for each autoscaled function, decides (``autoscaling.decide``) and applies the new
   count alone, under the field manager ``faastube-autoscaler`` (the reconciliation's
   applies leave that field out: ``reconcile.apply_autoscaled``).

A gateway that does not answer (or answers nonsense) changes nothing: its functions
keep their replicas, the failure is counted, and it is told at most once per
``warning_interval_s`` per workflow, in the log and as a Warning event. Scaling is
logged every time and told as a ScaledUp/ScaledDown event at most once per
``event_interval_s`` per function (changes in between are summed up in the next one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, Self

from faastube_operator import autoscaling, errors, k8s, reconcile
from faastube_operator.metrics import OperatorMetrics
from faastube_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Role = Literal["active", "standby", "unknown"]
FailureReason = Literal["unreachable", "http-error", "invalid-answer"]
MAX_ANSWER_BYTES = 1 << 20  # a /scale document is a few hundred bytes per function


class ScrapeFailed(errors.OperatorError):
    """A gateway's ``GET /scale`` gave no decision; ``reason`` is the metric's label."""

    def __init__(self, message: str, *, reason: FailureReason) -> None:
        self.reason = reason
        super().__init__(message)


class ScaleFetcher(Protocol):
    """How the loop asks a gateway; ``HttpScaleFetcher`` is the real one."""

    async def fetch(self, url: str) -> Any:
        """The decoded JSON of ``GET url``; ``ScrapeFailed`` when there is none."""


class HttpScaleFetcher:
    """``GET`` over one aiohttp session (connections and DNS answers are reused)."""

    def __init__(self, *, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._session: Any = None

    async def __aenter__(self) -> Self:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                                              headers={"User-Agent": "faastube-operator"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> Any:
        import aiohttp

        if self._session is None:
            raise RuntimeError("HttpScaleFetcher used outside `async with`")
        try:
            async with self._session.get(url) as response:
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ScrapeFailed(f"GET {url}: {e or type(e).__name__}", reason="unreachable") from e
        if status != 200:
            raise ScrapeFailed(f"GET {url}: HTTP {status}", reason="http-error")
        if len(body) > MAX_ANSWER_BYTES:
            raise ScrapeFailed(f"GET {url}: answer over {MAX_ANSWER_BYTES} bytes", reason="invalid-answer")
        try:
            return json.loads(body)
        except ValueError as e:
            raise ScrapeFailed(f"GET {url}: not JSON: {e}", reason="invalid-answer") from e


@dataclasses.dataclass(frozen=True)
class RoundReport:
    role: Role
    asked: tuple[str, ...] = ()  # namespace/workflow of the gateways asked
    failed: tuple[str, ...] = ()  # ...of those that gave no decision
    actions: tuple[autoscaling.ScaleAction, ...] = ()  # replicas set (applied)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Scaler:
    """One round at a time (``round_once``); ``run`` repeats it every interval."""

    def __init__(
        self,
        api: k8s.KubeApi,
        *,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        fetcher: ScaleFetcher,
        is_active: Callable[[], bool],
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self._api = api
        self._settings = settings
        self._metrics = metrics
        self._fetcher = fetcher
        self._is_active = is_active
        self._monotonic = monotonic
        self._clock = clock
        scaling = settings.autoscaling
        self._events: autoscaling.Throttle[tuple[str, str], tuple[autoscaling.ScaleAction, Mapping[str, Any]]] = \
            autoscaling.Throttle(scaling.event_interval_s)
        self._warnings: autoscaling.Throttle[tuple[str, str], tuple[str, Mapping[str, Any]]] = \
            autoscaling.Throttle(scaling.warning_interval_s)
        self.role: Role = "unknown"

    async def round_once(self) -> RoundReport:
        started = time.perf_counter()
        if not await asyncio.to_thread(self._is_active):
            if self.role != "standby":
                logger.info("scaling loop standing by: another replica is active")
            self.role = "standby"
            return RoundReport("standby")
        if self.role != "active":
            logger.info("scaling loop active: every %.3gs", self._settings.autoscaling.interval_s)
        self.role = "active"
        workflows, deployments = await asyncio.to_thread(self._read)
        jobs = autoscaling.plan_round(workflows, deployments, settings=self._settings)
        answers = await asyncio.gather(*(self._ask(job) for job in jobs))
        actions, failed = [], []
        for job, answer in zip(jobs, answers, strict=True):
            if answer is None:
                failed.append(f"{job.namespace}/{job.workflow}")
                continue
            for target in job.targets:
                action = autoscaling.decide(target, answer.get(target.function))
                if action is not None and await asyncio.to_thread(self._apply, job, action):
                    actions.append(action)
        await asyncio.to_thread(self._flush_held)
        self._metrics.autoscaling_round_duration.observe(time.perf_counter() - started)
        return RoundReport("active", tuple(f"{j.namespace}/{j.workflow}" for j in jobs),
                           tuple(failed), tuple(actions))

    def _read(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return (self._api.list("Workflow"),
                self._api.list("Deployment", labels={"app.kubernetes.io/managed-by": "faastube-operator"}))

    async def _ask(self, job: autoscaling.GatewayJob) -> dict[str, autoscaling.GatewayDecision] | None:
        key = (job.namespace, job.workflow)
        try:
            return self._answered(key, autoscaling.parse_scale_answer(await self._fetcher.fetch(job.url)))
        except autoscaling.InvalidScaleAnswer as e:
            failure = ScrapeFailed(f"GET {job.url}: {e}", reason="invalid-answer")
        except ScrapeFailed as e:
            failure = e
        self._metrics.scrape_failed(failure.reason)
        held = self._warnings.offer(key, (str(failure), job.body), now_s=self._monotonic())
        if held is not None:
            await asyncio.to_thread(self._warn, key, held)
        return None

    def _answered(self, key: tuple[str, str],
                  answer: dict[str, autoscaling.GatewayDecision]) -> dict[str, autoscaling.GatewayDecision]:
        if self._warnings.holds(key):
            logger.info("the gateway of %s/%s answers again", *key)
            self._warnings.forget(key)
        return answer

    def _warn(self, key: tuple[str, str], held: autoscaling.Held[tuple[str, Mapping[str, Any]]]) -> None:
        message, body = held.last
        more = f" ({held.count} failures since the last report)" if held.count > 1 else ""
        text = f"no scaling decision from the gateway, replicas kept: {message}{more}"
        logger.warning("workflow %s/%s: %s", *key, text)
        self._post(body, reconcile.Event("Warning", "GatewayScaleUnavailable", text))

    def _apply(self, job: autoscaling.GatewayJob, action: autoscaling.ScaleAction) -> bool:
        target = action.target
        ref = k8s.ObjectRef("Deployment", target.deployment, target.namespace)
        try:
            self._api.apply_replicas(ref, action.replicas, field_manager=k8s.AUTOSCALER_FIELD_MANAGER)
        except errors.KubeApiError as e:
            self._metrics.scaled(action.direction, applied=False)
            if e.status in (404, 422):  # deleted since it was listed: nothing to scale
                logger.debug("not scaling %s/%s: %s", target.namespace, target.deployment, e)
            else:
                logger.warning("scaling %s/%s to %d failed: %s", target.namespace, target.deployment,
                               action.replicas, e)
            return False
        self._metrics.scaled(action.direction, applied=True)
        logger.info("workflow %s/%s scaled %s", target.namespace, target.workflow, action.describe())
        held = self._events.offer((target.namespace, target.deployment), (action, job.body),
                                  now_s=self._monotonic())
        if held is not None:
            self._tell(held)
        return True

    def _tell(self, held: autoscaling.Held[tuple[autoscaling.ScaleAction, Mapping[str, Any]]]) -> None:
        (first, _), (last, body) = held.first, held.last
        if held.count == 1:
            message = last.describe()
        else:
            message = (f"{last.target.function}: {first.target.replicas} -> {last.replicas} replicas "
                       f"over {held.count} changes (last: {last.decision.reason}, concurrency "
                       f"{last.decision.concurrency:.2f})")
        if last.replicas == first.target.replicas:
            reason = "Scaled"  # back where it was: neither up nor down over the period
        else:
            reason = "ScaledUp" if last.replicas > first.target.replicas else "ScaledDown"
        self._post(body, reconcile.Event("Normal", reason, message))

    def _flush_held(self) -> None:
        now_s = self._monotonic()
        for _, held in self._events.due(now_s=now_s):
            self._tell(held)
        for key, warning in self._warnings.due(now_s=now_s):
            self._warn(key, warning)

    def _post(self, body: Mapping[str, Any], event: reconcile.Event) -> None:
        try:
            self._api.create(reconcile.event_object(body, event, now=self._clock(),
                                                    reporter=self._settings.peering.identity))
        except errors.KubeApiError as e:  # an event is worth a warning, not a failed round
            logger.warning("posting the %s event failed: %s", event.reason, e)

    async def run(self) -> None:
        """A round every ``autoscaling.interval_s`` until cancelled."""
        interval_s = self._settings.autoscaling.interval_s
        while True:
            began = self._monotonic()
            try:
                await self.round_once()
            except errors.KubeApiError as e:
                logger.warning("scaling round failed (next in %.3gs): %s", interval_s, e)
            except Exception:  # a bug in one round must not end scaling for good
                logger.exception("scaling round failed (next in %.3gs)", interval_s)
            await asyncio.sleep(max(0.0, interval_s - (self._monotonic() - began)))
