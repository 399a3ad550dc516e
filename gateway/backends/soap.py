"""What the two SOAP backends (SuperOffice customer port, InterServer) share over zeep.

`AnswerTransport` is zeep's `AsyncTransport` handing zeep httpx's own response. zeep's
`AsyncTransport.new_response` copies every answer into a `requests.Response` (a second
cookie jar parsed from the headers, a requests object built) although its SOAP binding
reads only `status_code`, `content`, `headers` and `encoding` of the answer
(`SoapBinding.process_reply`), which `httpx.Response` has with the same meaning: that copy was
about 8 % of a SOAP call's CPU.
"""

from __future__ import annotations

import httpx
from zeep.transports import AsyncTransport


class AnswerTransport(AsyncTransport):
    """zeep's async transport whose answers are the httpx responses themselves."""

    def new_response(self, response: httpx.Response) -> httpx.Response:
        response.read()  # as zeep's own: the body is there before the binding reads it
        return response
