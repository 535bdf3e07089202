"""What Ray Train's default checkpoint upload (`pyarrow.fs.copy_files`) reports when the object
store goes away while it uploads: the failure the 50-fault soak found (docs/benchmarks.md).

    python bench/upload_outage.py

A checkpoint-like folder (3 MB and 40 MB files) is copied to moto's S3 server through
bench/s3_meter.py; the meter is stopped for 2.2 s at a few moments into the copy. For each,
it prints whether copy_files raised and which objects are in the bucket afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Services  # bench/ is first on the path: this file runs as a script

FILES = {"model.safetensors": 3 << 20, "trainer.safetensors": 40 << 20}


def copy_through_outage(store: Services, local: Path, prefix: str, after_s: float) -> str:
    import pyarrow.fs as pafs

    filesystem = pafs.S3FileSystem(endpoint_override=store.url.split("//", 1)[1], scheme="http",
                                   access_key="bench", secret_key="bench-secret",
                                   region="us-east-1")  # fmt: skip

    def outage() -> None:
        time.sleep(after_s)
        store.stop_meter()
        time.sleep(2.2)
        store.start_meter()

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        pafs.copy_files(str(local), f"bench/{prefix}", destination_filesystem=filesystem)
        outcome = "returned"
    except OSError as error:
        outcome = f"raised {type(error).__name__}"
    thread.join()
    return outcome


def main() -> None:
    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="rqpipe-upload-"))
    local = work / "checkpoint"
    local.mkdir()
    for name, size in FILES.items():
        (local / name).write_bytes(os.urandom(size))
    store = Services(0, work / "moto.log")
    try:
        client = boto3.client("s3", endpoint_url=store.direct)
        client.create_bucket(Bucket="bench")
        print("| outage at | copy_files | objects written |\n|---:|---|---|")
        for i, after_s in enumerate((0.05, 0.3, 0.8)):
            outcome = copy_through_outage(store, local, f"try{i}", after_s)
            listed = client.list_objects_v2(Bucket="bench", Prefix=f"try{i}/")
            written = sorted(o["Key"].split("/")[-1] for o in listed.get("Contents", []))
            print(f"| {after_s} s | {outcome} | {', '.join(written) or 'none'} |")
    finally:
        store.stop()


if __name__ == "__main__":
    main()
