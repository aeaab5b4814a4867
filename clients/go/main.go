// Command mailbroker-follow lists the caller's accounts and, with -watch, follows one account's feed, printing one
// JSON line per account and event. It uses the generated stubs (generated/go) over one mutual-TLS connection and
// resumes the feed from its last token when the broker is UNAVAILABLE.
//
//	mailbroker-follow -target 127.0.0.1:50051 -ca ca.pem -cert client.pem -key client-key.pem \
//	    [-watch accounts/ID [-events N] [-heartbeat 5s] [-resume-token TOKEN]]
//
// Built offline with Debian's Go and gRPC packages in GOPATH mode: see clients/go/build.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	mailbrokerv1 "mailbroker.dev/generated/go/mailbroker/v1"
)

func dial(target, caFile, certFile, keyFile string) (*grpc.ClientConn, error) {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("no certificate in %s", caFile)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	config := &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	return grpc.Dial(target, grpc.WithTransportCredentials(credentials.NewTLS(config)))
}

// follow sends each event to emit until emit returns false or the stream ends, reconnecting from the last resume
// token after a jittered, growing delay whenever the broker is UNAVAILABLE.
func follow(ctx context.Context, mail mailbrokerv1.MailServiceClient, request *mailbrokerv1.WatchMailboxRequest,
	emit func(*mailbrokerv1.MailboxEvent) bool) error {
	failures := 0
	for {
		stream, err := mail.WatchMailbox(ctx, request)
		for err == nil {
			var event *mailbrokerv1.MailboxEvent
			if event, err = stream.Recv(); err == nil {
				failures = 0
				if event.ResumeToken != "" {
					request.ResumeToken = event.ResumeToken
				}
				if !emit(event) {
					return nil
				}
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if status.Code(err) != codes.Unavailable {
			return err
		}
		bound := 500 * time.Millisecond << failures
		if bound > 30*time.Second || bound <= 0 {
			bound = 30 * time.Second
		}
		failures++
		select {
		case <-time.After(time.Duration(rand.Int63n(int64(bound)))):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func run() error {
	target := flag.String("target", "", "broker address, host:port")
	caFile := flag.String("ca", "", "CA certificate (PEM) of the broker")
	certFile := flag.String("cert", "", "client certificate (PEM)")
	keyFile := flag.String("key", "", "client key (PEM)")
	watch := flag.String("watch", "", "follow this account, accounts/ID")
	events := flag.Int("events", 0, "stop after this many events (0: never)")
	heartbeat := flag.Duration("heartbeat", 0, "heartbeat interval to ask for (5s to 300s)")
	resumeToken := flag.String("resume-token", "", "resume the feed after this token")
	flag.Parse()
	if *target == "" || *caFile == "" || *certFile == "" || *keyFile == "" {
		return errors.New("-target, -ca, -cert and -key are required")
	}
	conn, err := dial(*target, *caFile, *certFile, *keyFile)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := json.NewEncoder(os.Stdout)

	accounts := mailbrokerv1.NewAccountServiceClient(conn)
	pageToken := ""
	for {
		call, stop := context.WithTimeout(ctx, 10*time.Second)
		page, err := accounts.ListAccounts(call, &mailbrokerv1.ListAccountsRequest{PageToken: pageToken})
		stop()
		if err != nil {
			return err
		}
		for _, account := range page.Accounts {
			if err := out.Encode(map[string]string{"account": account.Name, "emailAddress": account.EmailAddress}); err != nil {
				return err
			}
		}
		if pageToken = page.NextPageToken; pageToken == "" {
			break
		}
	}

	if *watch == "" {
		return nil
	}
	request := &mailbrokerv1.WatchMailboxRequest{Account: *watch, ResumeToken: *resumeToken}
	if *heartbeat > 0 {
		request.HeartbeatInterval = durationpb.New(*heartbeat)
	}
	seen := 0
	var encodeErr error
	err = follow(ctx, mailbrokerv1.NewMailServiceClient(conn), request, func(event *mailbrokerv1.MailboxEvent) bool {
		raw, err := protojson.Marshal(event)
		if err != nil {
			encodeErr = err
			return false
		}
		kind := ""
		if oneof := event.ProtoReflect().WhichOneof(event.ProtoReflect().Descriptor().Oneofs().ByName("event")); oneof != nil {
			kind = string(oneof.Name())
		}
		if encodeErr = out.Encode(map[string]interface{}{"kind": kind, "event": json.RawMessage(raw)}); encodeErr != nil {
			return false
		}
		seen++
		return *events == 0 || seen < *events
	})
	if err != nil {
		return err
	}
	return encodeErr
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "mailbroker-follow: %v\n", err)
		os.Exit(1)
	}
}
