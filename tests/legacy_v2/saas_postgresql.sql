--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: saas_outbox_counted(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_outbox_counted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, COUNT(*), SUM(quantity) FROM saas_new
    GROUP BY hour, dimension, state
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;


--
-- Name: saas_outbox_recounted(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_outbox_recounted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, SUM(d_records), SUM(d_quantity) FROM (
        SELECT hour, dimension, state, 1 AS d_records, quantity AS d_quantity FROM saas_new
        UNION ALL
        SELECT hour, dimension, state, -1, -quantity FROM saas_old
    ) AS delta GROUP BY hour, dimension, state HAVING SUM(d_records) <> 0
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: saas_batches; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_batches (
    id text NOT NULL,
    request text NOT NULL,
    records bigint NOT NULL,
    state text NOT NULL,
    parent text,
    created_at double precision NOT NULL,
    deadline double precision NOT NULL,
    attempts bigint DEFAULT 0 NOT NULL,
    last_code text,
    answered_at double precision
);


--
-- Name: saas_counts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_counts (
    hour bigint NOT NULL,
    dimension text NOT NULL,
    state text NOT NULL,
    records bigint NOT NULL,
    quantity bigint NOT NULL
);


--
-- Name: saas_customers; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_customers (
    customer text NOT NULL,
    account_id text,
    license_arn text,
    product_code text,
    customer_identifier text,
    state text NOT NULL,
    state_since double precision NOT NULL,
    state_reason text,
    resolved_at double precision NOT NULL,
    token_digest text,
    token_expires double precision
);


--
-- Name: saas_hour_sending; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_hour_sending (
    hour bigint NOT NULL,
    sealed_at double precision NOT NULL,
    records bigint NOT NULL,
    backlog_before bigint NOT NULL,
    finished_at double precision
);


--
-- Name: saas_hour_summary; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_hour_summary (
    hour bigint NOT NULL,
    dimension text NOT NULL,
    state text NOT NULL,
    records bigint NOT NULL,
    quantity bigint NOT NULL,
    zero_records bigint NOT NULL
);


--
-- Name: saas_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_keys (
    id text NOT NULL,
    digest text NOT NULL,
    answer text NOT NULL,
    created_at double precision NOT NULL
);


--
-- Name: saas_open; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_open (
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL
);


--
-- Name: saas_outbox; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_outbox (
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL,
    zero integer NOT NULL,
    record text NOT NULL,
    state text NOT NULL,
    batch_id text,
    sealed_at double precision NOT NULL,
    deadline double precision NOT NULL,
    metering_record_id text,
    last_code text,
    last_error text,
    done_at double precision
);


--
-- Name: saas_records; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_records (
    id text NOT NULL,
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL,
    received_at double precision NOT NULL,
    carried_from bigint
);


--
-- Name: saas_sealed_hours; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_sealed_hours (
    hour bigint NOT NULL,
    sealed_at double precision NOT NULL,
    records bigint NOT NULL
);


--
-- Name: sidecar_schema; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sidecar_schema (
    name text NOT NULL,
    version bigint NOT NULL,
    migrated_at double precision NOT NULL
);


--
-- Data for Name: saas_batches; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_batches VALUES ('6a8134fa11d248a3aa5623ae8058829a', '{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":2,"Timestamp":1799991000}]}', 1, 'done', NULL, 1799992920, 1800010680, 1, 'ok', 1799992921);
INSERT INTO public.saas_batches VALUES ('3abbaf5f297b43258b386764fda0c86c', '{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":7,"Timestamp":1799994600},{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","Quantity":3,"Timestamp":1799994600}]}', 2, 'sending', NULL, 1799996520, 1800014280, 0, NULL, NULL);


--
-- Data for Name: saas_counts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_counts VALUES (499997, 'scans', 'sealed', 0, 0);
INSERT INTO public.saas_counts VALUES (499997, 'scans', 'sent', 1, 2);
INSERT INTO public.saas_counts VALUES (499998, 'users', 'sealed', 1, 3);
INSERT INTO public.saas_counts VALUES (499998, 'scans', 'sealed', 1, 7);


--
-- Data for Name: saas_customers; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_customers VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', '111111111111', 'arn:aws:license-manager::111111111111:license:l-111111111111', 'p', NULL, 'active', 1799985600, NULL, 1799985600, '6c02cf2083469e72758a38be0b7c6eabe9bc58580774daf6b2cf4b6ea1469722', 1799989200);
INSERT INTO public.saas_customers VALUES ('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', '222222222222', 'arn:aws:license-manager::222222222222:license:l-222222222222', 'p', NULL, 'active', 1799985600, NULL, 1799985600, '3f08aace122ee2368432c1ca23a049bc640bafbf00fdf33a52429f38ba12dbf9', 1799989200);


--
-- Data for Name: saas_hour_sending; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_hour_summary; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_keys VALUES ('k-0', 'd6e9994bcd63e4415a3290a278f6b87f01b5433007c6c76e3a08824b83a620a8', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T05:00:00Z","id":"k-0","quantity":2}', 1799989800);
INSERT INTO public.saas_keys VALUES ('k-1', '5de0cd48536c07adcabf219431189fb60cc9fc0f356a0e9112fad6e317e21421', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T06:00:00Z","id":"k-1","quantity":7}', 1799993400);
INSERT INTO public.saas_keys VALUES ('k-2', '52b5ea798197e902f4e4b88f2b98982a65e45a1280f2894eeb2b09a2f4c59747', '{"customer":"222222222222/arn:aws:license-manager::222222222222:license:l-222222222222","dimension":"users","hour":"2027-01-15T06:00:00Z","id":"k-2","quantity":3}', 1799993400);
INSERT INTO public.saas_keys VALUES ('k-3', '499eb6b250fd6412268ac33ce65545822510de108edf5194a127f06117059273', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-3","quantity":5}', 1799999880);


--
-- Data for Name: saas_open; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_open VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499999, 5);


--
-- Data for Name: saas_outbox; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_outbox VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499997, 2, 0, '{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":2,"Timestamp":1799991000}', 'sent', '6a8134fa11d248a3aa5623ae8058829a', 1799992860, 1800010680, 'm-0', 'Success', NULL, 1799992921);
INSERT INTO public.saas_outbox VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499998, 7, 0, '{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":7,"Timestamp":1799994600}', 'sealed', '3abbaf5f297b43258b386764fda0c86c', 1799996460, 1800014280, NULL, NULL, NULL, NULL);
INSERT INTO public.saas_outbox VALUES ('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', 'users', 499998, 3, 0, '{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","Quantity":3,"Timestamp":1799994600}', 'sealed', '3abbaf5f297b43258b386764fda0c86c', 1799996460, 1800014280, NULL, NULL, NULL, NULL);


--
-- Data for Name: saas_records; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_records VALUES ('k-cbc792411d7344b1ae6870a8b4fcf261', '111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499997, 2, 1799989800, NULL);
INSERT INTO public.saas_records VALUES ('k-54d2d9199f4748459293576116eb1db0', '111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499998, 7, 1799993400, NULL);
INSERT INTO public.saas_records VALUES ('k-c446efcc1e7e4b289c4b7db3d08011c5', '222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', 'users', 499998, 3, 1799993400, NULL);
INSERT INTO public.saas_records VALUES ('k-7bbc39a8805e4030b9e50bc10f5375e7', '111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499999, 5, 1799999880, NULL);


--
-- Data for Name: saas_sealed_hours; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_sealed_hours VALUES (499997, 1799992860, 1);
INSERT INTO public.saas_sealed_hours VALUES (499998, 1799996460, 2);


--
-- Data for Name: sidecar_schema; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.sidecar_schema VALUES ('saas.sqlite3', 2, 1796667401.3035333);


--
-- Name: saas_batches saas_batches_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_batches
    ADD CONSTRAINT saas_batches_pkey PRIMARY KEY (id);


--
-- Name: saas_counts saas_counts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_counts
    ADD CONSTRAINT saas_counts_pkey PRIMARY KEY (hour, dimension, state);


--
-- Name: saas_customers saas_customers_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_customers
    ADD CONSTRAINT saas_customers_pkey PRIMARY KEY (customer);


--
-- Name: saas_hour_sending saas_hour_sending_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_hour_sending
    ADD CONSTRAINT saas_hour_sending_pkey PRIMARY KEY (hour);


--
-- Name: saas_hour_summary saas_hour_summary_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_hour_summary
    ADD CONSTRAINT saas_hour_summary_pkey PRIMARY KEY (hour, dimension, state);


--
-- Name: saas_keys saas_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_keys
    ADD CONSTRAINT saas_keys_pkey PRIMARY KEY (id);


--
-- Name: saas_open saas_open_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_open
    ADD CONSTRAINT saas_open_pkey PRIMARY KEY (customer, dimension, hour);


--
-- Name: saas_outbox saas_outbox_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_outbox
    ADD CONSTRAINT saas_outbox_pkey PRIMARY KEY (customer, dimension, hour);


--
-- Name: saas_records saas_records_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_records
    ADD CONSTRAINT saas_records_pkey PRIMARY KEY (id);


--
-- Name: saas_sealed_hours saas_sealed_hours_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_sealed_hours
    ADD CONSTRAINT saas_sealed_hours_pkey PRIMARY KEY (hour);


--
-- Name: sidecar_schema sidecar_schema_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sidecar_schema
    ADD CONSTRAINT sidecar_schema_pkey PRIMARY KEY (name);


--
-- Name: saas_batches_by_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_batches_by_state ON public.saas_batches USING btree (state, created_at);


--
-- Name: saas_customers_by_account; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_account ON public.saas_customers USING btree (account_id);


--
-- Name: saas_customers_by_identifier; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_identifier ON public.saas_customers USING btree (customer_identifier);


--
-- Name: saas_customers_by_token; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_token ON public.saas_customers USING btree (token_digest);


--
-- Name: saas_open_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_open_by_hour ON public.saas_open USING btree (hour);


--
-- Name: saas_outbox_by_batch; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_by_batch ON public.saas_outbox USING btree (batch_id) WHERE (batch_id IS NOT NULL);


--
-- Name: saas_outbox_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_by_hour ON public.saas_outbox USING btree (hour);


--
-- Name: saas_outbox_pool; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_pool ON public.saas_outbox USING btree (deadline, customer, dimension) WHERE ((state = 'sealed'::text) AND (batch_id IS NULL));


--
-- Name: saas_records_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_records_by_hour ON public.saas_records USING btree (hour, customer, dimension);


--
-- Name: saas_outbox saas_outbox_counted; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_counted AFTER INSERT ON public.saas_outbox REFERENCING NEW TABLE AS saas_new FOR EACH STATEMENT EXECUTE FUNCTION public.saas_outbox_counted();


--
-- Name: saas_outbox saas_outbox_recounted; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_recounted AFTER UPDATE ON public.saas_outbox REFERENCING OLD TABLE AS saas_old NEW TABLE AS saas_new FOR EACH STATEMENT EXECUTE FUNCTION public.saas_outbox_recounted();


--
-- PostgreSQL database dump complete
--


