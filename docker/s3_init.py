"""One-shot bucket creation for docker-compose: wait for the S3 endpoint, create the bucket of
PREFIXSERVE_OBJECT_STORE_URL if it is missing, exit 0. The API and the workers start after it succeeds.

The replicas would create the bucket themselves (S3BlobStore does, tolerating a race), but a failed start-up
then looks like an application error; a separate step fails early, on its own, with the S3 error in its log.
Reads the same settings as the service (app.config), so it cannot disagree with the replicas.
"""

from __future__ import annotations

import logging
import sys
import time

from app.config import load_settings
from prefix_store.blobs import BlobStoreUnavailable, open_blob_store

WAIT_S = 120.0
log = logging.getLogger("s3-init")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = load_settings()
    url = s.resolved_object_store_url
    if not url.startswith("s3://"):
        log.info("object store %s is not S3: nothing to create", url)
        return 0
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            # Opening the store checks the bucket and creates it when missing.
            store = open_blob_store(url, endpoint_url=s.s3_endpoint_url, access_key=s.s3_access_key_id,
                                    secret_key=s.s3_secret_access_key, region=s.s3_region)
        except BlobStoreUnavailable as exc:
            if time.monotonic() > deadline:
                log.error("gave up after %.0f s: %s", WAIT_S, exc)
                return 1
            log.info("waiting for S3: %s", exc)
            time.sleep(2)
            continue
        log.info("bucket ready: %r", store)
        return 0


if __name__ == "__main__":
    sys.exit(main())
