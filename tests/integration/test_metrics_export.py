"""What a scrape of Ray's metrics port shows for the service's declared metrics.

`serve/metrics.exposed_names` (and so docs/guide.md's table) states how Ray's agent names what we
declare; this asks Ray itself. A child process starts its own small Ray instance with a fixed metrics
port (in the suite, this process may already hold the service's cluster), records one value of every
declared metric from an actor, and prints the scrape.
"""

from __future__ import annotations

import pytest

from patchscope.serve.local import free_port
from patchscope.serve.metrics import DECLARED, QUEUED, exposed_names
from tests.integration.ray_child import run_ray_child

pytestmark = pytest.mark.ray

CHILD = r"""
import json, sys, time, urllib.request
import ray

port = int(sys.argv[2])
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1],
         _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})

@ray.remote(num_cpus=0)
class Replica:
    def record(self, queued):
        from patchscope.serve.metrics import DECLARED, ServiceMetrics, rejections
        m = ServiceMetrics()
        m.sites("tiny", 2); m.tokens(5); m.first_token(0.3); m.batch(4); m.queue_rows(queued)
        m.mapping("")
        rejections.count("INVALID_ARGUMENT", "invalid_argument", "layers")
        self.keep = m

def scrape(until):
    for _ in range(60):
        time.sleep(1)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        series = [line for line in text.splitlines() if line.startswith("ray_patchscope_")]
        if until(series):
            return series
    return series

replica = Replica.remote()
ray.get(replica.record.remote(3))
first = scrape(lambda s: len({l.split("{")[0] for l in s}) >= 11)
ray.get(replica.record.remote(0))
later = scrape(lambda s: any(l.startswith("ray_patchscope_queued_rows{") and l.endswith(" 0.0") for l in s))
print(json.dumps({"first": first, "later": later}))
ray.shutdown()
"""


def test_a_scrape_shows_every_declared_metric_under_its_documented_name():
    scraped = run_ray_child(CHILD, str(free_port()), prefix="ray-mx-", timeout_s=300)
    names = {line.split("{")[0] for line in scraped["first"]}
    expected = {name for spec in DECLARED for name in exposed_names(spec)}
    assert names == expected
    rejection = next(line for line in scraped["first"] if line.startswith("ray_patchscope_rejections_total"))
    assert 'code="INVALID_ARGUMENT"' in rejection and 'reason="invalid_argument"' in rejection
    assert 'field="layers"' in rejection
    queued = [line for line in scraped["later"] if line.startswith(exposed_names(QUEUED)[0] + "{")]
    assert queued and queued[-1].endswith(" 0.0"), "the gauge's 0 reaches the scrape"
