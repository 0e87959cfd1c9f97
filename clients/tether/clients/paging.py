"""Following a listing's page tokens: every listing RPC answers
next_page_token, empty on its last page."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)


async def pages(fetch: Callable[[str], Awaitable[P]]) -> AsyncIterator[P]:
    """Every page of a listing: fetch(page_token), from "" to the last page."""
    token = ""
    while True:
        page = await fetch(token)
        yield page
        token = page.next_page_token
        if not token:
            return


async def every(
    fetch: Callable[[str], Awaitable[P]], items: Callable[[P], Iterable[T]]
) -> AsyncIterator[T]:
    """Every item of a listing, page after page; items(page) picks a page's."""
    async for page in pages(fetch):
        for item in items(page):
            yield item
