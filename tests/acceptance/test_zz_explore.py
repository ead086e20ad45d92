import time
import pytest
import anyio
from tests.acceptance.helpers import order_record, wait_for_output, wait_for_exit

@pytest.mark.anyio
@pytest.mark.parametrize("how", ["term", "kill"])
async def test_explore(deploy, how) -> None:
    deployment, rows = await deploy(1)
    await deployment.produce([order_record(f"k-{i}") for i in (1, 2, 3)])
    t0 = time.monotonic()
    w = deployment.start("A", log__level="DEBUG")
    print("assigned after", await wait_for_output(w, "partitions assigned"))
    while (await rows.positions()).get(0) != 3:
        await anyio.sleep(0.1)
    if how == "term":
        w.terminate()
    else:
        w.kill()
    print("exit", await wait_for_exit(w))
    print("\n".join(l for l in w.output().splitlines() if "aiokafka" in l))
    w2 = deployment.start("B")
    print("assigned B after", await wait_for_output(w2, "partitions assigned"))
