"""The one event loop of a pfrest process.

``serve`` runs on uvloop where it is installed (Linux, macOS): it nearly halves the CPU each request
costs.  ``handle`` and ``query`` run on asyncio's own loop: one connection, a few requests, and what
counts is the memory of a process Postfix may start a hundred times (uvloop adds 1.1 MiB to each) and
its start.  docs/design.md gives the figures."""

import asyncio


def new_loop(fast=True):
    """uvloop's loop when ``fast`` and uvloop is installed, asyncio's otherwise."""
    if fast:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main, fast=True):
    """Run the coroutine ``main`` to its end on a new loop, then cancel whatever is left (a backend
    request the process no longer waits for) and close the loop."""
    loop = new_loop(fast)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
