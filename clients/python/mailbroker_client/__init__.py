"""A Python client for mailbroker.

    from mailbroker_client import connect

    with connect("broker.internal:50051", ca="ca.pem", cert="me.pem", key="me-key.pem") as broker:
        page = broker.accounts.ListAccounts(account_service_pb2.ListAccountsRequest())
        for event in broker.watch(page.accounts[0].name):
            ...

``connect`` opens one mTLS channel meant to live as long as the process; idempotent methods are retried on
UNAVAILABLE by gRPC itself (see ``SERVICE_CONFIG``); ``watch`` resumes a feed from its last token.
"""

from mailbroker_client.backoff import Backoff
from mailbroker_client.client import RETRIED_METHODS, SERVICE_CONFIG, Client, connect
from mailbroker_client.watch import watch

__all__ = ["RETRIED_METHODS", "SERVICE_CONFIG", "Backoff", "Client", "connect", "watch"]
