"""The private parts of torch's elastic agent that lsa_dist.elastic relies on, pinned: a torch
upgrade that renames or reshapes any of them fails here, loudly and by name, instead of silently
changing how the local launcher restarts, stops or reports its workers.

torch's public launcher API (`torch.distributed.launcher.api.elastic_launch`, what
`torch.distributed.run` uses) has no way to: refuse a restart after a worker's own verdict (exit 2,
bad input, or 3, a requested stop: both would only repeat), call back before each restart (to say
which rank failed and why), give each worker's exit to better than the monitor's poll (its
ProcessFailure timestamps have whole seconds, so the first rank to fail cannot be told from those it
took down), or keep a rank's log file across attempts (its redirects truncate per attempt)."""

from __future__ import annotations

import inspect

from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SubprocessContext

from lsa_dist.elastic import _Agent


def test_the_agent_hooks_lsa_dist_overrides_still_exist_with_their_signatures() -> None:
    for name in ("_start_workers", "_monitor_workers"):
        theirs = inspect.signature(getattr(LocalElasticAgent, name))
        assert list(theirs.parameters) == ["self", "worker_group"], f"LocalElasticAgent.{name} changed: {theirs}"
        assert name in vars(_Agent), f"lsa_dist.elastic._Agent no longer overrides {name}"


def test_restarts_are_still_counted_down_in_remaining_restarts() -> None:
    """_Agent sets _remaining_restarts to 0 to refuse a restart; the agent's loop must still read it."""
    loop = inspect.getsource(SimpleElasticAgent._invoke_run)
    assert "self._remaining_restarts > 0" in loop and "self._remaining_restarts -= 1" in loop


def test_worker_processes_are_still_reachable_through_the_process_context() -> None:
    """_Agent reads each worker's exit code from _pcontext.subprocess_handlers[rank].proc."""
    assert "self._pcontext" in inspect.getsource(LocalElasticAgent.__init__)
    source = inspect.getsource(SubprocessContext)
    assert "self.subprocess_handlers" in source and "handler.proc" in source
