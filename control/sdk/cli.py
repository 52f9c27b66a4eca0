"""The command line every vendor program shares: where the engine is, which
module code to serve, the secret, TLS, an instance name, and whether to attach to
every node of a cluster."""
from __future__ import annotations

import argparse
import os

from control.sdk.client import VendorClient


def vendor_argument_parser(description: str, code: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the common vendor options (add your own to it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--engine", default="127.0.0.1:50051", help="the engine's gRPC address")
    ap.add_argument("--code", default=code, help="the module code to serve")
    ap.add_argument("--secret", default=os.environ.get("BATON_VENDOR_SECRET", ""),
                    help="the vendor secret (default $BATON_VENDOR_SECRET)")
    ap.add_argument("--tls-ca", default="", help="CA certificate: connect with TLS")
    ap.add_argument("--instance", default="", help="a name for this process in the engine's logs")
    ap.add_argument("--discover", action="store_true",
                    help="--engine is one node of a cluster: attach to every node it lists")
    return ap


def client_from_args(args: argparse.Namespace) -> VendorClient:
    """A VendorClient for the options of `vendor_argument_parser`."""
    creds = None
    if args.tls_ca:
        import grpc

        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(f.read())
    return VendorClient(args.engine, args.code, args.secret, credentials=creds,
                        instance=args.instance or "", discover=getattr(args, "discover", False))
