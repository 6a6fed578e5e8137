"""A local Cloud Storage server for the gs:// tests: `gcp-storage-emulator` (PyPI), in memory.

    python tests/gcs_emulator.py PORT BUCKET

One gap of the emulator is filled here, because real GCS does not have it: a media download
does not send the object's generation in the `x-goog-generation` header. tensorstore (Orbax's
checkpoint backend) takes the generation from that header and refuses the conditional write of
an OCDBT manifest with "Malformed StorageGeneration" without it. Nothing else is changed.
"""

import sys


def serve(port: int, bucket: str) -> None:
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except Exception:  # noqa: BLE001 - a missing object is answered by the handler itself
            pass
        return download(request, response, storage, *args, **kwargs)

    objects.download = download_with_generation  # before `server` binds its route table
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
