module mailbroker.dev/generated/go

go 1.19
