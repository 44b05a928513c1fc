"""pdserve: disaggregated LLM serving (P/D-Serve and P/D-Device) as asyncio gRPC services."""
