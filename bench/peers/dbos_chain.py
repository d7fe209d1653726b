"""DBOS's side of the PostgreSQL chain comparison: a workflow of N durable no-op steps, one after
another, on the PostgreSQL database at URL. Prints the steps per second of the workflow's run.

    python3 dbos_chain.py postgresql://user@host:port/db N
"""

import sys
import time

from dbos import DBOS

url, n = sys.argv[1], int(sys.argv[2])
DBOS(config={"name": "chain", "system_database_url": url, "log_level": "WARNING"})


@DBOS.step()
def noop(i):
    return i


@DBOS.workflow()
def chain(n):
    for i in range(n):
        noop(i)


DBOS.launch()
started = time.perf_counter()
chain(n)
took = time.perf_counter() - started
print(f"{n / took:.1f}")
DBOS.destroy()
