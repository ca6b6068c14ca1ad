"""The old scripts' `aws s3 cp`, as its own process: boto3's transfer manager is what
the AWS CLI uses (8 MB multipart chunks, 10 concurrent requests).

    python bench/s3copy.py put FILE BUCKET KEY
    python bench/s3copy.py get BUCKET KEY FILE
"""

from __future__ import annotations

import sys

import boto3


def main(argv: list[str]) -> int:
    operation, *args = argv
    client = boto3.client("s3")
    if operation == "put":
        filename, bucket, key = args
        client.upload_file(filename, bucket, key)
    elif operation == "get":
        bucket, key, filename = args
        client.download_file(bucket, key, filename)
    else:
        print(f"s3copy: unknown operation {operation!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
